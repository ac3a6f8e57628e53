{{/* Names, labels, images and the pieces every workload shares. */}}

{{- define "iomni.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iomni.fullname" -}}
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

{{/* Object name of a component: <fullname>-<component>, underscores as dashes. */}}
{{- define "iomni.componentName" -}}
{{- printf "%s-%s" (include "iomni.fullname" .ctx) (.component | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iomni.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iomni.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component | replace "_" "-" }}
{{- end -}}

{{- define "iomni.labels" -}}
{{ include "iomni.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: iomni
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of the chart's non-workload objects (rules, dashboards, RBAC). */}}
{{- define "iomni.commonLabels" -}}
{{ include "iomni.labels" (dict "ctx" . "component" "platform") }}
{{- end -}}

{{/* repository:tag or repository@digest; an image without either is an error. */}}
{{- define "iomni.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else if .tag -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- else -}}
{{- fail (printf "image %s has neither a tag nor a digest" .repository) -}}
{{- end -}}
{{- end -}}

{{- define "iomni.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level security: non-root, seccomp RuntimeDefault. Arg: dict ctx, uid (optional). */}}
{{- define "iomni.podSecurityContext" -}}
{{- $sc := .ctx.Values.securityContext -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ default $sc.runAsUser .uid }}
  runAsGroup: {{ default $sc.runAsGroup .uid }}
  fsGroup: {{ default $sc.fsGroup .uid }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Container-level security: read-only root, no privilege escalation, no capabilities. */}}
{{- define "iomni.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Spread a component's pods over nodes and zones. Arg: dict ctx, component. */}}
{{- define "iomni.topologySpread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "iomni.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "iomni.selectorLabels" . | nindent 8 }}
    matchLabelKeys: ["pod-template-hash"]
{{- end -}}

{{/* nodeSelector / tolerations / affinity. Arg: dict nodeSelector, tolerations, affinity. */}}
{{- define "iomni.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Service DNS name of a component. */}}
{{- define "iomni.host" -}}
{{- printf "%s.%s.svc.%s" (include "iomni.componentName" .) .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* gRPC address of a Triton part. Arg: dict ctx, component (part name). */}}
{{- define "iomni.tritonAddress" -}}
{{- printf "%s:8001" (include "iomni.host" .) -}}
{{- end -}}

{{- define "iomni.kafkaBootstrap" -}}
{{- if .Values.devKafka.enabled -}}
{{- printf "%s:9092" (include "iomni.host" (dict "ctx" . "component" "kafka")) -}}
{{- else -}}
{{- .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* REDIS_URL env var: from the dev Redis, a Secret, or the plain URL. */}}
{{- define "iomni.redisEnv" -}}
- name: REDIS_URL
{{- if .Values.devRedis.enabled }}
  value: {{ printf "redis://%s:6379/0" (include "iomni.host" (dict "ctx" . "component" "redis")) | quote }}
{{- else if .Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- end -}}

{{/* Common environment of the iomni processes. */}}
{{- define "iomni.commonEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end -}}

{{/* The per-part Triton address flags shared by the gateway and the worker. */}}
{{- define "iomni.tritonFlags" -}}
- --triton
- {{ include "iomni.tritonAddress" (dict "ctx" . "component" "llm") }}
- --triton-vision
- {{ include "iomni.tritonAddress" (dict "ctx" . "component" "vision_encoder") }}
- --triton-audio
- {{ include "iomni.tritonAddress" (dict "ctx" . "component" "audio_encoder") }}
- --triton-speech
- {{ include "iomni.tritonAddress" (dict "ctx" . "component" "speech_decoder") }}
{{- end -}}

{{/* Checkpoint volume + mount (PVC subPath or objectStore emptyDir). */}}
{{- define "iomni.modelVolumes" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
- name: checkpoint
  emptyDir:
    sizeLimit: {{ .Values.model.objectStore.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "iomni.modelMounts" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model-store
  mountPath: {{ .Values.model.checkpointPath }}
  subPath: {{ .Values.model.pvc.checkpointSubPath }}
  readOnly: true
{{- else }}
- name: checkpoint
  mountPath: {{ .Values.model.checkpointPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Init container copying the checkpoint from the object store (objectStore only). */}}
{{- define "iomni.fetchInit" -}}
{{- if eq .ctx.Values.model.source "objectStore" }}
- name: fetch-checkpoint
  image: {{ include "iomni.image" .ctx.Values.images.fetch }}
  imagePullPolicy: {{ .ctx.Values.images.fetch.pullPolicy }}
  args: ["copy", "--fast-list", "--transfers", "8", {{ .ctx.Values.model.objectStore.url | quote }}, "/out"]
  env:
    - name: RCLONE_CONFIG
      value: /tmp/rclone.conf
    - name: HOME
      value: /tmp
  {{- with .ctx.Values.model.objectStore.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  {{- include "iomni.containerSecurityContext" . | nindent 2 }}
  resources:
    requests: {cpu: 500m, memory: 256Mi}
    limits: {memory: 1Gi}
  volumeMounts:
    - name: checkpoint
      mountPath: /out
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* HPA behavior: fast scale-up, slow scale-down that does not cut live dialogues. */}}
{{- define "iomni.behavior" -}}
{{- $a := .Values.autoscaling -}}
behavior:
  scaleUp:
    stabilizationWindowSeconds: {{ $a.scaleUp.stabilizationWindowSeconds }}
    selectPolicy: Max
    policies:
      - type: Pods
        value: {{ $a.scaleUp.pods }}
        periodSeconds: {{ $a.scaleUp.periodSeconds }}
  scaleDown:
    stabilizationWindowSeconds: {{ $a.scaleDown.stabilizationWindowSeconds }}
    selectPolicy: Min
    policies:
      - type: Pods
        value: {{ $a.scaleDown.pods }}
        periodSeconds: {{ $a.scaleDown.periodSeconds }}
{{- end -}}

{{/* PromQL: Triton queue time per request (µs) of one model, summed over pods, 0 when idle.
     The ratio of sums, not an average of per-pod averages (triton-inference-server#8979). */}}
{{- define "iomni.queuePerRequestQuery" -}}
{{- $sel := printf "model=\"%s\",namespace=\"%s\"" .model .ns -}}
(sum(rate(nv_inference_queue_duration_us{ {{- $sel -}} }[1m])) / (sum(rate(nv_inference_request_success{ {{- $sel -}} }[1m])) > 0)) or vector(0)
{{- end -}}

{{/* Shared PodDisruptionBudget. Arg: dict ctx, component, maxUnavailable. */}}
{{- define "iomni.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "iomni.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "iomni.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .maxUnavailable }}
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "iomni.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- /* A per-turn PromQL expression (`.`, with DOOR where the metric prefix's door goes) once
for each front door: the gateway (gRPC, Realtime; iomni_gateway_*) and the Kafka turn workers
(iomni_worker_*), which export the same turn series. One series per door, labelled front_door,
so a slow door is not averaged away by a busy fast one. */ -}}
{{- define "iomni.byFrontDoor" -}}
label_replace({{ . | replace "DOOR" "gateway" }}, "front_door", "gateway", "", "") or label_replace({{ . | replace "DOOR" "worker" }}, "front_door", "worker", "", "")
{{- end -}}
