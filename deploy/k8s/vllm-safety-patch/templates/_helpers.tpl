{{/* Names and labels shared by every manifest of the chart. */}}

{{- define "vsp.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vsp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vsp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vsp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vsp.labels" -}}
{{ include "vsp.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
vllm-safety-patch/variant: {{ .Values.variant }}
{{- end -}}

{{/* The Secret holding the admin token, or "" when hot-patching is off. */}}
{{- define "vsp.adminSecret" -}}
{{- if .Values.adminToken.existingSecret -}}
{{- .Values.adminToken.existingSecret -}}
{{- else if .Values.adminToken.value -}}
{{- printf "%s-admin" (include "vsp.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Render-time checks of what the schema cannot express; each message names the fix. */}}
{{- define "vsp.validate" -}}
{{- $owned := list "--model" "--host" "--port" "--load-format" "--model-loader-extra-config" -}}
{{- range .Values.vllmArgs -}}
{{- $flag := regexReplaceAll "=.*$" (toString .) "" -}}
{{- if has $flag $owned -}}
{{- fail (printf "vllmArgs: %s is set by the chart (model.path, service.port, deltas); remove it from vllmArgs" $flag) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.adminToken.existingSecret .Values.adminToken.value -}}
{{- fail "adminToken: give existingSecret or value, not both" -}}
{{- end -}}
{{- if and (eq .Values.variant "gpu") (not (index .Values.resources.gpu.limits "nvidia.com/gpu")) -}}
{{- fail "resources.gpu.limits must request nvidia.com/gpu for the gpu variant" -}}
{{- end -}}
{{- end -}}
