{{/* Names */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.fullname" -}}
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

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pdserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The worker pools, in rendering order. */}}
{{- define "pdserve.roles" -}}
["prefill", "decode", "hybrid"]
{{- end }}

{{/* Labels */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* Selector of one component. Args: dict "root" $ "component" "worker" ["role" "prefill"] */}}
{{- define "pdserve.componentSelector" -}}
{{ include "pdserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .role }}
pdserve.io/role: {{ . }}
{{- end }}
{{- end }}

{{/* Full labels of one component; same args as pdserve.componentSelector. */}}
{{- define "pdserve.componentLabels" -}}
{{ include "pdserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .role }}
pdserve.io/role: {{ . }}
{{- end }}
{{- end }}

{{/* Images */}}
{{- define "pdserve.workerImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "pdserve.routerImage" -}}
{{- printf "%s:%s" .Values.routerImage.repository (default .Chart.AppVersion .Values.routerImage.tag) }}
{{- end }}

{{/* etcd */}}
{{- define "pdserve.etcdInChart" -}}
{{- if not .Values.etcd.external.endpoints }}true{{ end }}
{{- end }}

{{- define "pdserve.etcdScheme" -}}
{{- if .Values.etcd.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* "true" when the router and workers present a client certificate to etcd: the
in-chart etcd with etcd.tls.enabled; an external etcd only when etcd.tls.clientSecret is given. */}}
{{- define "pdserve.etcdClientTLS" -}}
{{- $t := .Values.etcd.tls }}
{{- if and $t.enabled (or (include "pdserve.etcdInChart" .) $t.clientSecret) }}true{{ end }}
{{- end }}

{{/* "true" when the chart makes the in-chart etcd's CA and certificates itself (templates/etcd-certs.yaml). */}}
{{- define "pdserve.etcdGeneratedCerts" -}}
{{- $t := .Values.etcd.tls }}
{{- if and (include "pdserve.etcdInChart" .) $t.enabled (not $t.serverSecret) (not $t.clientSecret) }}true{{ end }}
{{- end }}

{{- define "pdserve.etcdServerSecretName" -}}
{{- .Values.etcd.tls.serverSecret | default (printf "%s-etcd-server-tls" (include "pdserve.fullname" .)) }}
{{- end }}

{{- define "pdserve.etcdClientSecretName" -}}
{{- .Values.etcd.tls.clientSecret | default (printf "%s-etcd-client-tls" (include "pdserve.fullname" .)) }}
{{- end }}

{{- define "pdserve.etcdHeadless" -}}
{{- printf "%s-etcd-headless" (include "pdserve.fullname" .) }}
{{- end }}

{{/* Comma-separated etcd client URLs for --etcd. */}}
{{- define "pdserve.etcdEndpoints" -}}
{{- if include "pdserve.etcdInChart" . }}
{{- printf "%s://%s-etcd.%s.svc:%d" (include "pdserve.etcdScheme" .) (include "pdserve.fullname" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- else }}
{{- $endpoints := join "," .Values.etcd.external.endpoints }}
{{- if and (contains "https://" $endpoints) (not (include "pdserve.etcdClientTLS" .)) }}
{{- fail "etcd.external.endpoints use https: set etcd.tls.clientSecret (a Secret with ca.crt, tls.crt and tls.key) so the router and workers can verify etcd and present a client certificate" }}
{{- end }}
{{- $endpoints }}
{{- end }}
{{- end }}

{{/* Host name of etcd member i. Args: dict "root" $ "i" 0 */}}
{{- define "pdserve.etcdMemberHost" -}}
{{- $root := .root }}
{{- printf "%s-etcd-%d.%s.%s.svc.%s" (include "pdserve.fullname" $root) (int .i) (include "pdserve.etcdHeadless" $root) $root.Release.Namespace $root.Values.etcd.clusterDomain }}
{{- end }}

{{- define "pdserve.etcdInitialCluster" -}}
{{- $root := . }}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $host := include "pdserve.etcdMemberHost" (dict "root" $root "i" $i) }}
{{- $members = append $members (printf "%s-etcd-%d=http://%s:%d" (include "pdserve.fullname" $root) $i $host (int $root.Values.etcd.peerPort)) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{- define "pdserve.keyNamespace" -}}
{{- default (printf "%s-%s" .Release.Namespace .Release.Name) .Values.keyNamespace }}
{{- end }}

{{/* Engine config of one pool: shared engine values, the pool's overrides, its role. Args: dict "root" $ "role" "prefill" */}}
{{- define "pdserve.engineConfig" -}}
{{- $pool := index .root.Values .role }}
{{- $config := mergeOverwrite (deepCopy .root.Values.engine) (deepCopy (default dict $pool.engine)) }}
{{- $_ := set $config "role" .role }}
{{- toYaml $config }}
{{- end }}

{{/* Environment shared by router and workers. Args: root context. */}}
{{- define "pdserve.commonEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: PDSERVE_NAMESPACE
  value: {{ include "pdserve.keyNamespace" . | quote }}
# The root filesystem is read-only: caches (triton, tokenizers) go to the /tmp emptyDir.
- name: HOME
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* TLS flags for --etcd and the gRPC server, shared by router and workers. */}}
{{- define "pdserve.tlsArgs" -}}
{{- if include "pdserve.etcdClientTLS" . }}
- --etcd-ca
- /etc/pdserve-tls/etcd/ca.crt
- --etcd-cert
- /etc/pdserve-tls/etcd/tls.crt
- --etcd-key
- /etc/pdserve-tls/etcd/tls.key
{{- end }}
{{- if .Values.tls.grpc.enabled }}
- --tls-ca
- /etc/pdserve-tls/grpc/ca.crt
- --tls-cert
- /etc/pdserve-tls/grpc/tls.crt
- --tls-key
- /etc/pdserve-tls/grpc/tls.key
{{- end }}
{{- end }}

{{- define "pdserve.tlsVolumes" -}}
{{- if include "pdserve.etcdClientTLS" . }}
- name: etcd-tls
  secret:
    secretName: {{ include "pdserve.etcdClientSecretName" . }}
{{- end }}
{{- if .Values.tls.grpc.enabled }}
- name: grpc-tls
  secret:
    secretName: {{ required "tls.grpc.secretName is required when tls.grpc.enabled" .Values.tls.grpc.secretName }}
{{- end }}
{{- end }}

{{- define "pdserve.tlsMounts" -}}
{{- if include "pdserve.etcdClientTLS" . }}
- name: etcd-tls
  mountPath: /etc/pdserve-tls/etcd
  readOnly: true
{{- end }}
{{- if .Values.tls.grpc.enabled }}
- name: grpc-tls
  mountPath: /etc/pdserve-tls/grpc
  readOnly: true
{{- end }}
{{- end }}

{{/* Liveness-style check of a gRPC port: the standard grpc.health.v1 service, or a
TCP check when the port serves TLS (Kubernetes gRPC probes are plaintext only).
Args: dict "root" $ "port" 50061 */}}
{{- define "pdserve.grpcCheck" -}}
{{- if .root.Values.tls.grpc.enabled }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
{{- end }}

{{/* Weights */}}
{{- define "pdserve.weightsVolume" -}}
{{- $w := .Values.weights }}
{{- if eq $w.source "pvc" }}
- name: weights
  persistentVolumeClaim:
    claimName: {{ required "weights.pvc.claimName is required when weights.source=pvc" $w.pvc.claimName }}
    readOnly: true
{{- else if eq $w.source "hostPath" }}
- name: weights
  hostPath:
    path: {{ required "weights.hostPath.path is required when weights.source=hostPath" $w.hostPath.path }}
    type: {{ $w.hostPath.type }}
{{- else if eq $w.source "initContainer" }}
- name: weights
  emptyDir:
    sizeLimit: {{ $w.initContainer.sizeLimit }}
{{- end }}
{{- end }}

{{- define "pdserve.weightsMount" -}}
{{- $w := .Values.weights }}
{{- if ne $w.source "none" }}
- name: weights
  mountPath: {{ $w.mountPath }}
  readOnly: true
  {{- if and (eq $w.source "pvc") $w.pvc.subPath }}
  subPath: {{ $w.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.weightsInitContainer" -}}
{{- $w := .Values.weights }}
{{- if eq $w.source "initContainer" }}
- name: fetch-weights
  image: {{ required "weights.initContainer.image is required when weights.source=initContainer" $w.initContainer.image }}
  imagePullPolicy: IfNotPresent
  {{- if $w.initContainer.command }}
  command: {{- toYaml $w.initContainer.command | nindent 4 }}
  {{- else }}
  command: ["sh", "-c", {{ printf "cp -a %s/. %s/" $w.initContainer.sourcePath $w.mountPath | quote }}]
  {{- end }}
  env:
    - name: WEIGHTS_DIR
      value: {{ $w.mountPath }}
    {{- with $w.initContainer.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $w.initContainer.resources }}
  resources: {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext: {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: weights
      mountPath: {{ $w.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* "3" or "1-8, autoscaled", for NOTES.txt. Args: the router or a pool's values. */}}
{{- define "pdserve.notesScale" -}}
{{- if .autoscaling.enabled }}{{ .autoscaling.minReplicas }}-{{ .autoscaling.maxReplicas }}, autoscaled{{ else }}{{ .replicas }}{{ end }}
{{- end }}

{{/* HorizontalPodAutoscaler spec body. Args: dict "root" $ "name" "<deployment>" "autoscaling" {...} */}}
{{- define "pdserve.hpaSpec" -}}
{{- $a := .autoscaling }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s: autoscaling.minReplicas (%d) must not exceed maxReplicas (%d)" .name (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
scaleTargetRef:
  apiVersion: apps/v1
  kind: Deployment
  name: {{ .name }}
minReplicas: {{ $a.minReplicas }}
maxReplicas: {{ $a.maxReplicas }}
metrics:
{{- if $a.metrics }}
{{- toYaml $a.metrics | nindent 2 }}
{{- else }}
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
{{- end }}
{{- with $a.behavior }}
behavior: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Secret holding the workers' shared cluster secret */}}
{{- define "pdserve.clusterSecretName" -}}
{{- .Values.clusterSecret.existingSecret | default (printf "%s-cluster-secret" (include "pdserve.fullname" .)) }}
{{- end }}

{{/*
A worker pool's container resources. A CUDA pool's pods get tp x dp GPUs (a worker runs
dp replicas of tp ranks, one GPU each), in requests and limits; a pool that names a
different GPU count is refused at render time.
*/}}
{{- define "pdserve.workerResources" -}}
{{- $res := deepCopy (default (dict) .pool.resources) }}
{{- if eq (toString .engine.device_type) "cuda" }}
{{- $want := mul (int .engine.tp) (int .engine.dp) }}
{{- $limits := default (dict) $res.limits }}
{{- $requests := default (dict) $res.requests }}
{{- range $given := list (index $limits "nvidia.com/gpu") (index $requests "nvidia.com/gpu") }}
{{- if and $given (ne (int $given) (int $want)) }}
{{- fail (printf "%s: resources name nvidia.com/gpu=%d, but engine tp=%d x dp=%d needs %d GPUs per pod (leave it out: the chart sets it)" $.role (int $given) (int $.engine.tp) (int $.engine.dp) (int $want)) }}
{{- end }}
{{- end }}
{{- $_ := set $limits "nvidia.com/gpu" $want }}
{{- $_ := set $requests "nvidia.com/gpu" $want }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}
