{{/*
Names and labels (qdrant-helm conventions).
*/}}
{{- define "rsllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rsllm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rsllm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rsllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rsllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rsllm.labels" -}}
helm.sh/chart: {{ include "rsllm.chart" . }}
{{ include "rsllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rsllm
{{- end }}

{{/*
The services, in dependency order: key in .Values -> binary (= component label).
*/}}
{{- define "rsllm.components" -}}
embedding: embedding-service
prompt: prompt-service
llm: llm-service
{{- end }}

{{/* Environment-variable infix of a component: embedding -> EMBEDDING. */}}
{{- define "rsllm.envInfix" -}}
{{- upper . }}
{{- end }}

{{/* Resource name of a component. Call with (dict "root" $ "c" "embedding"). */}}
{{- define "rsllm.componentName" -}}
{{- printf "%s-%s" (include "rsllm.fullname" .root | trunc 50 | trimSuffix "-") .c }}
{{- end }}

{{- define "rsllm.componentSelectorLabels" -}}
{{ include "rsllm.selectorLabels" .root }}
app.kubernetes.io/component: {{ get (include "rsllm.components" . | fromYaml) .c }}
{{- end }}

{{- define "rsllm.componentLabels" -}}
{{ include "rsllm.labels" .root }}
app.kubernetes.io/component: {{ get (include "rsllm.components" . | fromYaml) .c }}
{{- end }}

{{- define "rsllm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rsllm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "root" $ "image" <component image values>).
*/}}
{{- define "rsllm.image" -}}
{{- $registry := .root.Values.image.registry | trimSuffix "/" }}
{{- $repo := .image.repository }}
{{- if $registry }}{{ $repo = printf "%s/%s" $registry $repo }}{{ end }}
{{- printf "%s:%s" $repo (.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/*
gRPC endpoint (http://host:port) of a component, as the other services call it.
Call with (dict "root" $ "c" "embedding").
*/}}
{{- define "rsllm.endpoint" -}}
{{- $v := index .root.Values .c }}
{{- if $v.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "rsllm.componentName" .) .root.Release.Namespace (int $v.ports.grpc) }}
{{- else if $v.externalEndpoint }}
{{- $v.externalEndpoint }}
{{- else }}
{{- fail (printf "%s.enabled is false: set %s.externalEndpoint for the services that call it" .c .c) }}
{{- end }}
{{- end }}

{{/* Bundled Redis resource name. */}}
{{- define "rsllm.redisName" -}}
{{- printf "%s-redis" (include "rsllm.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/* The Redis URL that goes into the ConfigMaps ("" when it comes from a Secret or is off). */}}
{{- define "rsllm.redisUrl" -}}
{{- $r := .Values.redis }}
{{- $sources := 0 }}
{{- if $r.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if $r.existingSecret.name }}{{ $sources = add1 $sources }}{{ end }}
{{- if $r.bundled.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt $sources 1 }}
{{- fail "redis: set only one of redis.url, redis.existingSecret.name and redis.bundled.enabled" }}
{{- end }}
{{- if $r.bundled.enabled }}
{{- printf "redis://%s.%s.svc:%d" (include "rsllm.redisName" .) .Release.Namespace (int $r.bundled.port) }}
{{- else }}
{{- $r.url }}
{{- end }}
{{- end }}

{{/* A human description of the Redis mode (NOTES). */}}
{{- define "rsllm.redisMode" -}}
{{- if .Values.redis.bundled.enabled }}bundled ({{ include "rsllm.redisUrl" . }})
{{- else if .Values.redis.existingSecret.name }}external, URL from Secret {{ .Values.redis.existingSecret.name }}/{{ .Values.redis.existingSecret.key }}
{{- else if .Values.redis.url }}external ({{ .Values.redis.url }})
{{- else }}none: the caches are off (set redis.url or redis.bundled.enabled)
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds of a component: explicit (checked) or preStop + drain + 10.
Call with (dict "c" "embedding" "v" <component values>).
*/}}
{{- define "rsllm.terminationGrace" -}}
{{- $floor := add (int .v.preStopSleepSeconds) (int .v.drainTimeoutSeconds) }}
{{- $explicit := int .v.terminationGracePeriodSeconds }}
{{- if eq $explicit 0 }}
{{- add $floor 10 }}
{{- else if le $explicit $floor }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + drainTimeoutSeconds (%d), or the kubelet kills calls that are still draining" .c $explicit $floor) }}
{{- else }}
{{- $explicit }}
{{- end }}
{{- end }}

{{/* Volume name -> claim name. Call with (dict "root" $ "name" "models"). */}}
{{- define "rsllm.claimName" -}}
{{- $v := index .root.Values.volumes .name }}
{{- default (printf "%s-%s" (include "rsllm.fullname" .root | trunc 50 | trimSuffix "-") .name) $v.claimName }}
{{- end }}

{{/* One pod volume for models, data or jobs. Call with (dict "root" $ "name" "models"). */}}
{{- define "rsllm.volume" -}}
{{- $v := index .root.Values.volumes .name }}
- name: {{ .name }}
{{- if eq $v.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "rsllm.claimName" . }}
{{- else if eq $v.type "hostPath" }}
  {{- if not $v.hostPath }}
  {{- fail (printf "volumes.%s.type is hostPath: set volumes.%s.hostPath" .name .name) }}
  {{- end }}
  hostPath:
    path: {{ $v.hostPath }}
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* The cache and tmp emptyDirs every pod gets. */}}
{{- define "rsllm.scratchVolumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.volumes.cache.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.volumes.tmp.sizeLimit }}
{{- end }}

{{/*
OpenTelemetry environment (container env entries). Call with (dict "root" $ "service" name).
*/}}
{{- define "rsllm.otelEnv" -}}
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .root.Values.otel }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.service | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | quote }}
{{- $attrs := list (printf "k8s.namespace.name=%s" $.root.Release.Namespace) "k8s.pod.name=$(K8S_POD_NAME)" (printf "service.version=%s" $.root.Chart.AppVersion) }}
{{- range $k, $v := .resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of each service, as a flat name: value map (rendered into its ConfigMap, and
hashed into checksum/config). Call with (dict "root" $ "c" "embedding").
*/}}
{{- define "rsllm.env" -}}
{{- $root := .root }}
{{- $v := index $root.Values .c }}
{{- $X := include "rsllm.envInfix" .c }}
{{- $models := $root.Values.volumes.models.mountPath }}
{{- $env := dict }}
{{- $_ := set $env (printf "RSLLM_%s_LISTEN" $X) (printf "%s:%d" $root.Values.listenHost (int $v.ports.grpc)) }}
{{- $_ := set $env (printf "RSLLM_%s_METRICS_LISTEN" $X) (printf "%s:%d" $root.Values.listenHost (int $v.ports.metrics)) }}
{{- $_ := set $env (printf "RSLLM_%s_JSON_LOGS" $X) (ternary "true" "false" $root.Values.logging.json) }}
{{- $_ := set $env (printf "RSLLM_%s_DRAIN_TIMEOUT_SECS" $X) (toString (int $v.drainTimeoutSeconds)) }}
{{- if not $root.Values.redis.existingSecret.name }}
{{- $_ := set $env (printf "RSLLM_%s_REDIS_URL" $X) (include "rsllm.redisUrl" $root) }}
{{- end }}
{{- $_ := set $env "RSLLM_CACHE_DIR" "/cache" }}
{{- $_ := set $env "HOME" "/tmp" }}
{{- if $root.Values.logging.rustLog }}
{{- $_ := set $env "RUST_LOG" $root.Values.logging.rustLog }}
{{- end }}
{{- if eq .c "embedding" }}
{{- $_ := set $env "RSLLM_EMBEDDING_MODELS_DIR" (printf "%s/rec" $models) }}
{{- if $v.models }}
{{- $_ := set $env "RSLLM_EMBEDDING_MODELS" (join "," $v.models) }}
{{- end }}
{{- $_ := set $env "RSLLM_EMBEDDING_DEVICE" $v.device }}
{{- else if eq .c "prompt" }}
{{- $_ := set $env "RSLLM_DATA_DIR" $root.Values.volumes.data.mountPath }}
{{- $_ := set $env "RSLLM_PROMPT_TOKENIZER" (printf "%s/%s" $models ($v.tokenizer | default $root.Values.llmModel)) }}
{{- $_ := set $env "RSLLM_PROMPT_EMBEDDING_ENDPOINT" (include "rsllm.endpoint" (dict "root" $root "c" "embedding")) }}
{{- $domains := list }}
{{- range $d, $artefact := $v.domains }}
{{- $domains = append $domains (printf "%s=%s" $d $artefact) }}
{{- end }}
{{- $_ := set $env "RSLLM_PROMPT_DOMAINS" (join "," $domains) }}
{{- else if eq .c "llm" }}
{{- $_ := set $env "RSLLM_DATA_DIR" $root.Values.volumes.data.mountPath }}
{{- $_ := set $env "RSLLM_LLM_MODEL" (printf "%s/%s" $models $root.Values.llmModel) }}
{{- $adapters := list }}
{{- range $d, $src := $v.adapters }}
{{- if or (eq $src "zero-shot") (hasPrefix "/" $src) }}
{{- $adapters = append $adapters (printf "%s=%s" $d $src) }}
{{- else }}
{{- $adapters = append $adapters (printf "%s=%s/%s" $d $models $src) }}
{{- end }}
{{- end }}
{{- if $adapters }}
{{- $_ := set $env "RSLLM_LLM_ADAPTERS" (join "," $adapters) }}
{{- end }}
{{- $_ := set $env "RSLLM_LLM_DEVICE" $v.device }}
{{- $_ := set $env "RSLLM_LLM_DTYPE" $v.dtype }}
{{- $_ := set $env "RSLLM_LLM_PROMPT_ENDPOINT" (include "rsllm.endpoint" (dict "root" $root "c" "prompt")) }}
{{- $_ := set $env "RSLLM_LLM_EMBEDDING_ENDPOINT" (include "rsllm.endpoint" (dict "root" $root "c" "embedding")) }}
{{- $_ := set $env "RSLLM_LLM_MAX_BATCH" (toString (int $v.maxBatch)) }}
{{- $_ := set $env "RSLLM_LLM_MAX_WAIT_MS" (toString (int $v.maxWaitMs)) }}
{{- $_ := set $env "RSLLM_LLM_QUEUE_CAPACITY" (toString (int $v.queueCapacity)) }}
{{- $_ := set $env "RSLLM_LLM_JOBS_DIR" $root.Values.volumes.jobs.mountPath }}
{{- end }}
{{- range $k, $val := $v.env }}
{{- $_ := set $env $k (toString $val) }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/* Which of models/data/jobs a component mounts (models and data read-only). */}}
{{- define "rsllm.componentVolumes" -}}
{{- if eq . "embedding" }}["models"]
{{- else if eq . "prompt" }}["models", "data"]
{{- else }}["models", "data", "jobs"]
{{- end }}
{{- end }}

{{/* preStop handler. Call with (dict "root" $ "seconds" N). */}}
{{- define "rsllm.preStop" -}}
{{- if eq .root.Values.preStopAction "sleep" }}
sleep:
  seconds: {{ int .seconds }}
{{- else }}
exec:
  command: ["/bin/sleep", "{{ int .seconds }}"]
{{- end }}
{{- end }}

{{/*
The training pod spec (Job and CronJob). Call with (dict "root" $ "args" list).
*/}}
{{- define "rsllm.trainingPodSpec" -}}
{{- $root := .root }}
{{- $t := $root.Values.training }}
serviceAccountName: {{ include "rsllm.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
restartPolicy: Never
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
containers:
  - name: train
    image: {{ include "rsllm.image" (dict "root" $root "image" $t.image) }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args:
      {{- toYaml .args | nindent 6 }}
    workingDir: {{ $root.Values.volumes.jobs.mountPath }}
    env:
      - name: RSLLM_DATA_DIR
        value: {{ $root.Values.volumes.data.mountPath | quote }}
      # Prepared splits, trained recommenders and checkpoints persist on the jobs volume.
      - name: RSLLM_CACHE_DIR
        value: {{ printf "%s/cache" $root.Values.volumes.jobs.mountPath | quote }}
      - name: RSLLM_LLM_MODEL
        value: {{ printf "%s/%s" $root.Values.volumes.models.mountPath $root.Values.llmModel | quote }}
      - name: RSLLM_DEVICE
        value: {{ $t.device | quote }}
      - name: RSLLM_LLM_DTYPE
        value: {{ $t.dtype | quote }}
      - name: RSLLM_LOG_JSON
        value: {{ ternary "true" "false" $root.Values.logging.json | quote }}
      - name: HOME
        value: /tmp
      {{- with $root.Values.logging.rustLog }}
      - name: RUST_LOG
        value: {{ . | quote }}
      {{- end }}
      {{- /* No OTEL_* here: the rsllm CLI exports no traces; a training pod's record is its
      JSON log lines and the run directory on the jobs volume. */}}
      {{- range $k, $val := $t.env }}
      - name: {{ $k }}
        value: {{ toString $val | quote }}
      {{- end }}
    securityContext:
      {{- toYaml $root.Values.containerSecurityContext | nindent 6 }}
    resources:
      {{- toYaml $t.resources | nindent 6 }}
    volumeMounts:
      - name: models
        mountPath: {{ $root.Values.volumes.models.mountPath }}
        readOnly: true
      - name: data
        mountPath: {{ $root.Values.volumes.data.mountPath }}
        readOnly: true
      - name: jobs
        mountPath: {{ $root.Values.volumes.jobs.mountPath }}
      - name: tmp
        mountPath: /tmp
volumes:
  {{- include "rsllm.volume" (dict "root" $root "name" "models") | trim | nindent 2 }}
  {{- include "rsllm.volume" (dict "root" $root "name" "data") | trim | nindent 2 }}
  {{- include "rsllm.volume" (dict "root" $root "name" "jobs") | trim | nindent 2 }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ $root.Values.volumes.tmp.sizeLimit }}
{{- with $t.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
