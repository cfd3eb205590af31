"""Evaluation: refusal, over-refusal and utility, in-process or against an OpenAI endpoint."""
