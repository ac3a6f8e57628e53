{{/*
One autoscaler for one Deployment: a KEDA ScaledObject (autoscaling.engine keda) or an
autoscaling/v2 HorizontalPodAutoscaler (engine hpa, metrics from prometheus-adapter).
Args: dict ctx, component, min, max, keda (YAML list of triggers), hpa (YAML list of metrics),
      auth (optional TriggerAuthentication name).
*/}}
{{- define "iomni.autoscaler" -}}
{{- $engine := .ctx.Values.autoscaling.engine -}}
{{- $name := include "iomni.componentName" . -}}
{{- if eq $engine "keda" }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "iomni.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicaCount: {{ .min }}
  maxReplicaCount: {{ .max }}
  pollingInterval: {{ .ctx.Values.autoscaling.pollingInterval }}
  advanced:
    horizontalPodAutoscalerConfig:
      name: {{ $name }}
      {{- include "iomni.behavior" .ctx | nindent 6 }}
  triggers:
    {{- .keda | nindent 4 }}
{{- else if eq $engine "hpa" }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "iomni.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ .min }}
  maxReplicas: {{ .max }}
  metrics:
    {{- .hpa | nindent 4 }}
  {{- include "iomni.behavior" .ctx | nindent 2 }}
{{- end }}
{{- end -}}
