{{/* vim: set filetype=mustache: */}}

{{/* Chart name. */}}
{{- define "bloodcnn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name prefix. Truncated to 40 characters so that suffixed names stay valid: KubeRay caps
RayService/RayJob names at 47 (it appends 6 characters for the RayCluster and "-serve-svc").
*/}}
{{- define "bloodcnn.fullname" -}}
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

{{/* Name of a KubeRay resource: at most 47 characters (KubeRay's limit). */}}
{{- define "bloodcnn.rayName" -}}
{{- . | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/* A run id as text (numbers from values files arrive as floats: print them as integers). */}}
{{- define "bloodcnn.runId" -}}
{{- if kindIs "float64" . -}}{{ int64 . }}{{- else -}}{{ toString . | lower }}{{- end -}}
{{- end -}}

{{- define "bloodcnn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels (stable across upgrades). */}}
{{- define "bloodcnn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bloodcnn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Common labels. */}}
{{- define "bloodcnn.labels" -}}
helm.sh/chart: {{ include "bloodcnn.chart" . }}
{{ include "bloodcnn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bloodcnn
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels for a component: (dict "root" $ "component" "serving"). */}}
{{- define "bloodcnn.componentLabels" -}}
{{ include "bloodcnn.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "bloodcnn.componentSelectorLabels" -}}
{{ include "bloodcnn.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Pod labels: no chart/app version, so a chart upgrade alone does not roll Ray clusters. */}}
{{- define "bloodcnn.podLabels" -}}
{{ include "bloodcnn.componentSelectorLabels" . }}
app.kubernetes.io/part-of: bloodcnn
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "bloodcnn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bloodcnn.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The bloodcnn image reference. */}}
{{- define "bloodcnn.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{- define "bloodcnn.configMapName" -}}
{{- printf "%s-config" (include "bloodcnn.fullname" .) -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------
S3 credentials. The chart manages a Secret when credentials are given or the dev S3 is on;
existingSecret wins; with neither, no credential env is set (IRSA / workload identity).
------------------------------------------------------------------------------------------- */}}
{{- define "bloodcnn.s3.managedSecret" -}}
{{- if and (not .Values.s3.existingSecret) (or .Values.s3.accessKeyId .Values.s3.secretAccessKey .Values.devS3.enabled) -}}
true
{{- end -}}
{{- end -}}

{{- define "bloodcnn.s3.hasCredentials" -}}
{{- if or .Values.s3.existingSecret (include "bloodcnn.s3.managedSecret" .) -}}
true
{{- end -}}
{{- end -}}

{{- define "bloodcnn.s3.secretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else -}}
{{- printf "%s-s3" (include "bloodcnn.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "bloodcnn.s3.accessKeyIdKey" -}}
{{- if .Values.s3.existingSecret -}}{{ .Values.s3.accessKeyIdKey }}{{- else -}}AWS_ACCESS_KEY_ID{{- end -}}
{{- end -}}

{{- define "bloodcnn.s3.secretAccessKeyKey" -}}
{{- if .Values.s3.existingSecret -}}{{ .Values.s3.secretAccessKeyKey }}{{- else -}}AWS_SECRET_ACCESS_KEY{{- end -}}
{{- end -}}

{{- define "bloodcnn.devS3.name" -}}
{{- printf "%s-s3" (include "bloodcnn.fullname" .) -}}
{{- end -}}

{{/* AWS_ENDPOINT_URL: explicit, else the dev S3 Service, else unset (AWS). */}}
{{- define "bloodcnn.s3.endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.devS3.enabled -}}
{{- printf "http://%s.%s.svc:8333" (include "bloodcnn.devS3.name" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- define "bloodcnn.apiKey.enabled" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value -}}
true
{{- end -}}
{{- end -}}

{{- define "bloodcnn.apiKey.secretName" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else -}}
{{- printf "%s-api-key" (include "bloodcnn.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------
The application config (AppConfig YAML): storage-derived defaults <- .Values.config.
------------------------------------------------------------------------------------------- */}}
{{- define "bloodcnn.appConfig" -}}
{{- $bucket := .Values.s3.bucket -}}
{{- $ds := .Values.datasetName -}}
{{- $derived := dict
  "data" (dict
    "source" (printf "s3://%s/raw/%s" $bucket $ds)
    "output" (printf "s3://%s/datasets/%s" $bucket $ds))
  "train" (dict
    "dataset" (printf "s3://%s/datasets/%s" $bucket $ds)
    "storage_path" (printf "s3://%s/runs" $bucket))
  "registry" (dict "uri" (printf "s3://%s/models" $bucket))
  "serve" (dict "host" "0.0.0.0" "port" 8000) -}}
{{- toYaml (mustMergeOverwrite $derived (deepCopy .Values.config)) -}}
{{- end -}}

{{/* Path of the mounted config file. */}}
{{- define "bloodcnn.configPath" -}}/etc/bloodcnn/config.yaml{{- end -}}

{{/* ------------------------------------------------------------------------------------------
The Ray Serve config (serveConfigV2) rendered from the app config and .Values.serving.
------------------------------------------------------------------------------------------- */}}
{{- define "bloodcnn.serveConfig" -}}
{{- $cfg := include "bloodcnn.appConfig" . | fromYaml -}}
{{- $serve := $cfg.serve -}}
{{- range $key := list "model_version" "max_batch_size" "batch_wait_timeout_s" "uncertain_threshold" "uncertain_rule" "version_poll_s" "max_pixels" "runtime" "max_ongoing_requests" "num_cpus_per_replica" "autoscaling" -}}
{{- if not (hasKey $serve $key) -}}
{{- fail (printf "config.serve.%s must be set: it feeds the RayService serveConfigV2" $key) -}}
{{- end -}}
{{- end -}}
{{- $sv := .Values.serving -}}
{{- $batch := int $serve.max_batch_size -}}
{{- $ongoing := int $serve.max_ongoing_requests -}}
{{- /* Mirrors serving/app.py classifier_options(): a deployment's options given here replace the
code's, so user_config and autoscaling_config must be complete. */ -}}
{{- $autoscaling := deepCopy $serve.autoscaling -}}
{{- if hasKey $autoscaling "look_back_period_s" -}}
{{- $_ := set $autoscaling "metrics_interval_s" (minf 10.0 (divf $autoscaling.look_back_period_s 2.0)) -}}
{{- end -}}
{{- /* serve.ingress colocated: the classifier replicas serve HTTP themselves (serving/service.py
BloodService, one hop), so the app has that one deployment and no APIIngress. */ -}}
{{- $colocated := eq ($serve.ingress | default "separate") "colocated" -}}
{{- $classifier := dict
  "name" (ternary "BloodService" $sv.classifier.name $colocated)
  "max_ongoing_requests" (max $ongoing $batch)
  "autoscaling_config" $autoscaling
  "ray_actor_options" (dict "num_cpus" $serve.num_cpus_per_replica "num_gpus" $sv.classifier.numGpus)
  "user_config" (dict
    "registry_uri" $cfg.registry.uri
    "model_name" $cfg.registry.model_name
    "model_version" $serve.model_version
    "max_batch_size" $serve.max_batch_size
    "batch_wait_timeout_s" $serve.batch_wait_timeout_s
    "uncertain_threshold" $serve.uncertain_threshold
    "uncertain_rule" $serve.uncertain_rule
    "version_poll_s" $serve.version_poll_s
    "max_pixels" $serve.max_pixels
    "runtime" $serve.runtime) -}}
{{- $apiIngress := dict
  "name" $sv.apiIngress.name
  "max_ongoing_requests" (max (mul 2 $ongoing) (mul 4 $batch))
  "ray_actor_options" (dict "num_cpus" $sv.apiIngress.numCpus)
  "autoscaling_config" (dict
    "min_replicas" $sv.apiIngress.minReplicas
    "max_replicas" $sv.apiIngress.maxReplicas
    "target_ongoing_requests" $sv.apiIngress.targetOngoingRequests) -}}
{{- $app := dict
  "name" $sv.applicationName
  "import_path" $sv.importPath
  "route_prefix" $sv.routePrefix
  "deployments" (ternary (list $classifier) (list $apiIngress $classifier) $colocated) -}}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" 8000 "keep_alive_timeout_s" 30)
  "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------
Pod building blocks shared by Ray pods, the data-prep Job and the helm test.
------------------------------------------------------------------------------------------- */}}
{{- define "bloodcnn.env" -}}
- name: BLOODCNN_CONFIG
  value: {{ include "bloodcnn.configPath" . | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with (include "bloodcnn.s3.endpoint" .) }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if include "bloodcnn.s3.hasCredentials" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "bloodcnn.s3.secretName" . }}
      key: {{ include "bloodcnn.s3.accessKeyIdKey" . }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "bloodcnn.s3.secretName" . }}
      key: {{ include "bloodcnn.s3.secretAccessKeyKey" . }}
{{- end }}
{{- if include "bloodcnn.apiKey.enabled" . }}
- name: BLOODCNN_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "bloodcnn.apiKey.secretName" . }}
      key: {{ .Values.apiKey.key }}
{{- end }}
- name: PYTHONPATH
  value: {{ .Values.image.workingDir | quote }}
- name: KERAS_HOME
  value: /tmp/keras
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: TF_CPP_MIN_LOG_LEVEL
  value: "2"
{{- if eq (dig "serve" "proxy" "python" .Values.config) "haproxy" }}
# config.serve.proxy haproxy: Ray Serve's HAProxy mode, read by Ray when it starts in the pod
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "bloodcnn.volumes" -}}
- name: config
  configMap:
    name: {{ include "bloodcnn.configMapName" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end -}}

{{- define "bloodcnn.volumeMounts" -}}
- name: config
  mountPath: /etc/bloodcnn
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "bloodcnn.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "bloodcnn.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end -}}

{{/* Restarts pods when the app config changes. */}}
{{- define "bloodcnn.configChecksum" -}}
{{- include "bloodcnn.appConfig" . | sha256sum | trunc 16 -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------
Ray groups. Arguments: (dict "root" $ "component" "serving|training" "group" <values> ...).
------------------------------------------------------------------------------------------- */}}

{{/* The pod template of a Ray node. Extra args: "type" (head|worker), "gpus" (int, 0 for none),
"autoscaler" (bool: head runs the autoscaler sidecar, which needs the ServiceAccount token). */}}
{{- define "bloodcnn.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $head := eq .type "head" -}}
metadata:
  labels:
    {{- include "bloodcnn.podLabels" (dict "root" $root "component" .component) | nindent 4 }}
    bloodcnn.io/ray-node-type: {{ .type }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "bloodcnn.configChecksum" $root }}
    {{- with $g.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "bloodcnn.serviceAccountName" $root }}
  automountServiceAccountToken: {{ and $head .autoscaler | ternary true false }}
  enableServiceLinks: false
  securityContext:
    {{- include "bloodcnn.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ $head | ternary "ray-head" "ray-worker" }}
      image: {{ include "bloodcnn.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      # `ray start` runs here, so Ray job entrypoints like `python jobs/train.py` resolve.
      workingDir: {{ $root.Values.image.workingDir }}
      securityContext:
        {{- include "bloodcnn.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "bloodcnn.env" $root | nindent 8 }}
      ports:
        {{- if $head }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        - name: serve
          containerPort: 8000
        - name: metrics
          containerPort: 8080
      resources:
        {{- $res := deepCopy $g.resources }}
        {{- if gt (int .gpus) 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.limits)) }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.requests)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        {{- include "bloodcnn.volumeMounts" $root | nindent 8 }}
  volumes:
    {{- include "bloodcnn.volumes" $root | nindent 4 }}
{{- end -}}

{{/* rayClusterSpec for a component: (dict "root" $ "component" "serving" "values" .Values.serving). */}}
{{- define "bloodcnn.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $component := .component -}}
rayVersion: {{ $root.Values.ray.version | quote }}
{{- if eq $root.Values.ray.auth.mode "token" }}
authOptions:
  mode: token
  {{- with $root.Values.ray.auth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
enableInTreeAutoscaling: {{ $v.autoscaler.enabled }}
{{- if $v.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- include "bloodcnn.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml (default (dict) $v.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "bloodcnn.rayPodTemplate" (dict "root" $root "component" $component "group" $v.head "type" "head" "gpus" 0 "autoscaler" $v.autoscaler.enabled) | nindent 4 }}
workerGroupSpecs:
{{- $groups := list -}}
{{- if $v.worker.enabled }}{{ $groups = append $groups (dict "group" $v.worker "gpus" 0) }}{{ end -}}
{{- if $v.gpuWorker.enabled }}{{ $groups = append $groups (dict "group" $v.gpuWorker "gpus" $v.gpuWorker.gpus) }}{{ end -}}
{{- range $name, $extra := $v.additionalWorkerGroups }}
{{- $g := merge (dict "groupName" $name) (deepCopy $extra) -}}
{{- $groups = append $groups (dict "group" $g "gpus" (default 0 $extra.gpus)) -}}
{{- end }}
{{- if not $groups }} []{{ end }}
{{- range $groups }}
{{- $g := .group }}
  - groupName: {{ $g.groupName }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams:
      {{- toYaml (default (dict) $g.rayStartParams) | nindent 6 }}
    template:
      {{- include "bloodcnn.rayPodTemplate" (dict "root" $root "component" $component "group" $g "type" "worker" "gpus" .gpus "autoscaler" false) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Pod spec of the data-preparation Job. */}}
{{- define "bloodcnn.prepareDataPodSpec" -}}
{{- $d := .Values.dataPrep -}}
restartPolicy: Never
serviceAccountName: {{ include "bloodcnn.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "bloodcnn.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $d.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $d.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $d.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: prepare-data
    image: {{ include "bloodcnn.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    workingDir: {{ .Values.image.workingDir }}
    command:
      - python
      - jobs/prepare_data.py
      - --config
      - {{ include "bloodcnn.configPath" . }}
    securityContext:
      {{- include "bloodcnn.containerSecurityContext" . | nindent 6 }}
    env:
      {{- include "bloodcnn.env" . | nindent 6 }}
    resources:
      {{- toYaml $d.resources | nindent 6 }}
    volumeMounts:
      {{- include "bloodcnn.volumeMounts" . | nindent 6 }}
volumes:
  {{- include "bloodcnn.volumes" . | nindent 2 }}
{{- end -}}
