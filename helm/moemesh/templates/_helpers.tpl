{{/* Names and labels. */}}
{{- define "moemesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moemesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Every pod of this release (what NetworkPolicies admit). */}}
{{- define "moemesh.meshSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The pods of one role: call with (dict "root" $ "role" "decode"). */}}
{{- define "moemesh.selector" -}}
{{ include "moemesh.meshSelector" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* The roles this topology runs, as "role:valuesKey" pairs: colocated workers take the decode values. */}}
{{- define "moemesh.roles" -}}
{{- if eq .Values.topology "colocated" -}}
gateway:gateway colocated:decode
{{- else if eq .Values.topology "pd" -}}
gateway:gateway prefill:prefill decode:decode
{{- else -}}
gateway:gateway prefill:prefill decode:decode expert:expert
{{- end -}}
{{- end -}}

{{- define "moemesh.gatewayAddress" -}}
{{ include "moemesh.fullname" . }}-gateway:{{ .Values.gateway.port }}
{{- end -}}

{{- define "moemesh.image" -}}
{{- $tag := .values.image.tag | default (ternary (printf "%s-cpu" .root.Chart.AppVersion) .root.Chart.AppVersion (or (eq .role "gateway") (eq (int (.values.gpus | default 0)) 0))) -}}
{{ .values.image.repository }}:{{ $tag }}
{{- end -}}

{{- define "moemesh.modelArg" -}}
{{- if eq .Values.model.source "demo" -}}demo{{- else -}}{{ .Values.model.mountPath }}{{- end -}}
{{- end -}}

{{- define "moemesh.httpPort" -}}
{{- if eq .role "gateway" -}}{{ .root.Values.gateway.httpPort }}{{- else -}}{{ .root.Values.telemetry.metrics.workerHttpPort }}{{- end -}}
{{- end -}}

{{/* The container's args: `moemesh serve <role> ...`. Call with (dict "root" $ "role" r "values" v). */}}
{{- define "moemesh.args" -}}
{{- $v := .values -}}
{{- $V := .root.Values -}}
- serve
- {{ .role }}
{{- if eq .role "gateway" }}
- --host
- 0.0.0.0
{{- else }}
- --host
- $(POD_IP)
{{- end }}
- --port
- {{ $v.port | quote }}
- --model
- {{ include "moemesh.modelArg" .root | quote }}
{{- if eq .role "gateway" }}
- --topology
- {{ $V.topology }}
- --http-port
- {{ $V.gateway.httpPort | quote }}
{{- else }}
- --device
- {{ ternary "cuda" "cpu" (gt (int $v.gpus) 0) }}
- --registry
- {{ include "moemesh.gatewayAddress" .root }}
- --worker-id
- $(POD_NAME)
{{- if $V.telemetry.metrics.enabled }}
- --http-port
- {{ $V.telemetry.metrics.workerHttpPort | quote }}
{{- end }}
{{- end }}
{{- with $V.telemetry.otlpEndpoint }}
- --otlp-endpoint
- {{ . | quote }}
{{- end }}
{{- if $V.tls.enabled }}
- --tls-dir
- /etc/moemesh/tls
{{- end }}
{{- if and $V.auth.enabled (eq .role "gateway") }}
- --api-keys
- /etc/moemesh/auth/api-keys
{{- end }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Probes on the gRPC health service; with mTLS the kubelet (which speaks no TLS) checks the port instead. */}}
{{- define "moemesh.probes" -}}
{{- $check := dict "grpc" (dict "port" (int .values.port)) -}}
{{- if .root.Values.tls.enabled -}}
{{- $check = dict "tcpSocket" (dict "port" "grpc") -}}
{{- end -}}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
  failureThreshold: 180  # loading a large checkpoint: up to 30 minutes
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* resources plus the GPUs and RDMA devices the role asks for. */}}
{{- define "moemesh.resources" -}}
{{- $res := deepCopy (.values.resources | default dict) -}}
{{- $extra := dict -}}
{{- if and (ne .role "gateway") (gt (int .values.gpus) 0) -}}
{{- $_ := set $extra "nvidia.com/gpu" (int .values.gpus) -}}
{{- end -}}
{{- if and (ne .role "gateway") .root.Values.ucx.rdma.resourceName -}}
{{- $_ := set $extra .root.Values.ucx.rdma.resourceName (int .root.Values.ucx.rdma.count) -}}
{{- end -}}
{{- if $extra -}}
{{- $_ := set $res "limits" (merge (deepCopy $extra) ($res.limits | default dict)) -}}
{{- $_ := set $res "requests" (merge (deepCopy $extra) ($res.requests | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
