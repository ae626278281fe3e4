{{/* Names and labels shared by every object of the release. */}}
{{- define "constellation.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "constellation.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" NAME). */}}
{{- define "constellation.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "constellation.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The container security context every container of the chart runs with. */}}
{{- define "constellation.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* gRPC probes on the stock grpc.health.v1 service; service "" is the whole server. */}}
{{- define "constellation.probes" -}}
startupProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}

{{/* Writable places under a read-only root: /tmp and the cache directory. */}}
{{- define "constellation.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/constellation
{{- end -}}
{{- define "constellation.scratchVolumes" -}}
- name: tmp
  emptyDir: {sizeLimit: 256Mi}
- name: cache
  emptyDir: {sizeLimit: 2Gi}
{{- end -}}

{{/* Addresses of the mesh inside the cluster. */}}
{{- define "constellation.address" -}}
{{ include "constellation.fullname" .root }}-{{ .component }}:{{ .port }}
{{- end -}}

{{/* Environment of service `name`: binding, ports, peers, Consul, extras. (dict "root" $ "name" N "svc" S) */}}
{{- define "constellation.serviceEnv" -}}
{{- $prefix := printf "CONSTELLATION_%s_" (upper .name) -}}
- name: {{ $prefix }}HOST
  value: "0.0.0.0"
{{- /* Pods bind every interface; without API keys configured (security.auth) that is refused unless
     the operator says so. The chart says so explicitly until it provisions keys and certificates. */}}
- name: {{ $prefix }}SECURITY__INSECURE
  value: "true"
- name: {{ $prefix }}PORT
  value: {{ .svc.port | quote }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ .svc.metricsPort | quote }}
- name: CONSTELLATION_CACHE_DIR
  value: /var/cache/constellation
- name: HOME
  value: /tmp
- name: OTEL_SERVICE_NAME
  value: {{ .name | quote }}
{{- if eq .name "dispatch" }}
- name: {{ $prefix }}HTTP_PORT
  value: {{ .root.Values.frontDoor.httpPort | quote }}
{{- end }}
{{- if and (eq .name "scaler") .root.Values.autoscaling.keda.enabled }}
- name: {{ $prefix }}ACTUATOR
  value: "keda"
{{- end }}
{{- if .root.Values.consul.enabled }}
- name: CONSUL_HTTP_ADDR
  value: {{ .root.Values.consul.httpAddr | quote }}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: {{ $prefix }}ADVERTISE_HOST
  value: $(POD_IP)
{{- end }}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Where each service finds the others. (dict "root" $ "name" N) */}}
{{- define "constellation.peerEnv" -}}
{{- $root := .root -}}
{{- $full := include "constellation.fullname" $root -}}
{{- $prefix := printf "CONSTELLATION_%s_" (upper .name) -}}
{{- $triton := "" -}}
{{- with $root.Values.triton.modelGroups -}}
{{- $triton = printf "%s-triton-%s:%v" $full (first .).name $root.Values.triton.grpcPort -}}
{{- end -}}
{{- if eq .name "dispatch" }}
- name: {{ $prefix }}CLASSIFIER_URL
  value: {{ $full }}-classifier:{{ $root.Values.services.classifier.port }}
- name: {{ $prefix }}REGISTRY_URL
  value: {{ $full }}-registry:{{ $root.Values.registry.port }}
- name: {{ $prefix }}RANKING_URL
  value: {{ $full }}-ranking:{{ $root.Values.services.ranking.port }}
- name: {{ $prefix }}FUSION_URL
  value: {{ $full }}-fusion:{{ $root.Values.services.fusion.port }}
{{- end }}
{{- if and $triton (has .name (list "dispatch" "fusion" "scaler")) }}
- name: {{ $prefix }}TRITON_URL
  value: {{ $triton }}
{{- end }}
{{- if eq .name "scaler" }}
- name: {{ $prefix }}REGISTRY_URL
  value: {{ $full }}-registry:{{ $root.Values.registry.port }}
{{- end }}
{{- end -}}

{{/* The front door's API keys and TLS certificate, mounted read-only into dispatch. */}}
{{- define "constellation.apiKeysSecret" -}}
{{- if .Values.secrets.apiKeys.existingSecret -}}{{ .Values.secrets.apiKeys.existingSecret }}{{- else if .Values.secrets.apiKeys.create -}}{{ include "constellation.fullname" . }}-api-keys{{- end -}}
{{- end -}}
{{- define "constellation.tlsSecret" -}}
{{- if .Values.secrets.tls.enabled -}}
{{- if .Values.secrets.tls.existingSecret -}}{{ .Values.secrets.tls.existingSecret }}{{- else -}}{{ include "constellation.fullname" . }}-tls{{- end -}}
{{- end -}}
{{- end -}}
{{- define "constellation.secretMounts" -}}
{{- if include "constellation.apiKeysSecret" . }}
- name: api-keys
  mountPath: /etc/constellation/keys
  readOnly: true
{{- end }}
{{- if include "constellation.tlsSecret" . }}
- name: tls
  mountPath: /etc/constellation/tls
  readOnly: true
{{- end }}
{{- end -}}
{{- define "constellation.secretVolumes" -}}
{{- with include "constellation.apiKeysSecret" . }}
- name: api-keys
  secret: {secretName: {{ . }}, defaultMode: 0440}
{{- end }}
{{- with include "constellation.tlsSecret" . }}
- name: tls
  secret: {secretName: {{ . }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{/* A model group's model names, comma-separated. */}}
{{- define "constellation.modelNames" -}}
{{- $names := list -}}
{{- range .models }}{{ $names = append $names .name }}{{ end -}}
{{- join "," $names -}}
{{- end -}}
