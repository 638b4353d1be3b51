{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.labels" -}}
{{ include "kiln.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kiln.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kiln.gpusPerReplica" -}}
{{- mul (int .Values.engine.tensorParallelSize) (int .Values.engine.pipelineParallelSize) -}}
{{- end -}}

{{- define "kiln.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "kiln.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{/* The model as the engine sees it inside a pod. */}}
{{- define "kiln.modelPath" -}}
{{- $p := .Values.model.path -}}
{{- if not $p -}}
{{- else if or .Values.model.randomWeights (hasPrefix "/" $p) (eq .Values.model.storage.type "none") -}}
{{- $p -}}
{{- else -}}
{{- printf "/models/%s" $p -}}
{{- end -}}
{{- end -}}

{{/*
The Ray Serve config, in the structure `kiln serve-config` prints from the same ServeConfig
dataclasses `kiln serve` uses (tests/helm checks that the two agree field for field).
*/}}
{{- define "kiln.serveConfig" -}}
{{- $e := .Values.engine -}}
{{- $s := .Values.serve -}}
{{- $model := include "kiln.modelPath" . -}}
{{- $engine := dict
    "model" (ternary nil $model (eq $model ""))
    "random_weights" .Values.model.randomWeights
    "dtype" $e.dtype
    "device" $e.device
    "seed" 0
    "enforce_eager" false
    "cpu_threads" 0
    "cache" (dict "block_size" (int $e.blockSize) "gpu_memory_utilization" (float64 $e.gpuMemoryUtilization)
                  "kv_cache_bytes" nil "num_blocks" nil "enable_prefix_caching" $e.enablePrefixCaching)
    "scheduler" (dict "max_num_seqs" (int $e.maxNumSeqs) "max_num_batched_tokens" (int $e.maxNumBatchedTokens)
                      "max_model_len" (int $e.maxModelLen) "async_scheduling" nil)
    "parallel" (dict "tensor_parallel_size" (int $e.tensorParallelSize)
                     "pipeline_parallel_size" (int $e.pipelineParallelSize)
                     "collective_timeout_s" 120.0 "heartbeat_s" 0.5)
    "quant" (dict "mode" $e.quant "kv_cache_dtype" $e.kvCacheDtype "group_size" 128 "calibration_tokens" 2048
                  "lm_head" "auto") -}}
{{- $router := dict "policy" $s.routing "decode_cost_tokens" 32.0 "kv_usage_limit" 0.95
    "max_queued_per_replica" (int $s.maxQueuedRequests) "retry_after_s" 1 -}}
{{- $args := dict
    "engine" $engine
    "router" $router
    "num_replicas" (int $s.replicas.initial)
    "min_replicas" (int $s.replicas.min)
    "max_replicas" (int $s.replicas.max)
    "target_ongoing_requests" (int $s.targetOngoingRequests)
    "upscale_delay_s" (float64 $s.upscaleDelaySeconds)
    "downscale_delay_s" (float64 $s.downscaleDelaySeconds)
    "host" "0.0.0.0"
    "port" (int .Values.service.port)
    "api_key" nil
    "model_name" (ternary nil .Values.model.servedName (eq .Values.model.servedName ""))
    "app_name" "kiln"
    "stream_events_per_s" (float64 $s.streamEventsPerSecond) -}}
{{- $app := dict "name" "kiln" "route_prefix" "/" "import_path" "kiln.cluster.deployment:app_builder" "args" $args -}}
{{- $cfg := dict "proxy_location" "HeadOnly"
    "http_options" (dict "host" "0.0.0.0" "port" (int .Values.service.port))
    "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Volumes and mounts for the model, shared by head (for the tokenizer) and workers. */}}
{{- define "kiln.modelVolumes" -}}
{{- $st := .Values.model.storage -}}
{{- if eq $st.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $st.existingClaim }}
    readOnly: {{ and $st.readOnly (not $st.init.enabled) }}
{{- else if eq $st.type "hostPath" }}
- name: models
  hostPath:
    path: {{ $st.hostPath }}
    type: Directory
{{- else if eq $st.type "emptyDir" }}
- name: models
  emptyDir:
    sizeLimit: {{ $st.emptyDirSizeLimit }}
{{- end }}
{{- end -}}

{{- define "kiln.modelMounts" -}}
{{- if ne .Values.model.storage.type "none" }}
- name: models
  mountPath: /models
  readOnly: {{ ne .Values.model.storage.type "emptyDir" }}
{{- end }}
{{- end -}}

{{- define "kiln.initContainers" -}}
{{- $init := .Values.model.storage.init -}}
{{- if and $init.enabled (ne .Values.model.storage.type "none") }}
initContainers:
  - name: fetch-model
    image: {{ default (include "kiln.image" .) $init.image }}
    command: {{ toJson $init.command }}
    volumeMounts:
      - name: models
        mountPath: /models
{{- end }}
{{- end -}}

{{- define "kiln.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: NCCL_NVLS_ENABLE
  value: "0"
{{- if .Values.apiKey.enabled }}
- name: KILN_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "kiln.apiKeySecret" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end -}}
