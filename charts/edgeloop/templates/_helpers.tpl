{{/* Names, labels and derived values shared by the templates. */}}

{{- define "edgeloop.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, prefixed with the chart name unless it contains it. */}}
{{- define "edgeloop.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "edgeloop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "edgeloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgeloop
{{- end }}

{{- define "edgeloop.operatorSelector" -}}
app.kubernetes.io/name: {{ include "edgeloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "edgeloop.storeSelector" -}}
app.kubernetes.io/name: {{ include "edgeloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: store
{{- end }}

{{- define "edgeloop.serviceAccountName" -}}
{{- default (include "edgeloop.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{- define "edgeloop.operatorImage" -}}
{{- $image := .Values.operator.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "edgeloop.runtimeImage" -}}
{{- default (printf "ghcr.io/edgeloop/runtime:%s" .Chart.AppVersion) .Values.config.runtimeImage }}
{{- end }}

{{- define "edgeloop.storeImage" -}}
{{- if .Values.store.image.repository }}
{{- printf "%s:%s" .Values.store.image.repository (default .Chart.AppVersion .Values.store.image.tag) }}
{{- else }}
{{- include "edgeloop.runtimeImage" . }}
{{- end }}
{{- end }}

{{/* The operator configuration file, as edgeloop.config reads it. */}}
{{- define "edgeloop.operatorConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- /* The operator merges classes over its built-in ones (values.yaml lists them, and a unit test keeps the two
equal): a built-in class removed from the values (set to null) is removed with an explicit null. */}}
{{- range list "npu" "gpu" "cpu" }}
{{- if not (hasKey $config.acceleratorClasses .) }}
{{- $_ := set $config.acceleratorClasses . nil }}
{{- end }}
{{- end }}
{{- /* The built-in classes' runtime flavours, at the chart's version unless the values name an image. */}}
{{- range $name, $flavour := dict "npu" "openvino" "gpu" "cuda" }}
{{- $class := index $config.acceleratorClasses $name }}
{{- if and $class (not $class.image) }}
{{- $_ := set $class "image" (printf "ghcr.io/edgeloop/runtime-%s:%s" $flavour $.Chart.AppVersion) }}
{{- end }}
{{- end }}
{{- range $name, $class := $config.acceleratorClasses }}
{{- if and $class (ne (last $class.executionProviders) "CPUExecutionProvider") }}
{{- fail (printf "config.acceleratorClasses.%s.executionProviders must end with CPUExecutionProvider, so every node can serve" $name) }}
{{- end }}
{{- end }}
{{- $_ := set $config "runtimeImage" (include "edgeloop.runtimeImage" .) }}
{{- $_ := set $config "federatedImage" (default (printf "ghcr.io/edgeloop/runtime-federated:%s" .Chart.AppVersion) .Values.config.federatedImage) }}
{{- $_ := set $config "tls" (omit .Values.tls "issuer") }}
{{- if eq .Values.tls.mode "cert-manager" }}
{{- $_ := set $config.tls "issuer" .Values.tls.issuer }}
{{- end }}
{{- if .Values.modelCache.persistentVolume }}
{{- $_ := set $config "modelCacheClaim" .Values.modelCache.claimName }}
{{- end }}
{{- if .Values.datasets.persistentVolume }}
{{- $_ := set $config "datasetClaim" .Values.datasets.claimName }}
{{- end }}
{{- if .Values.store.enabled }}
{{- $scheme := ternary "https" "http" .Values.store.tls.enabled }}
{{- $_ := set $config "storeUrl" (printf "%s://%s-store.%s.svc:%d" $scheme (include "edgeloop.fullname" .) .Release.Namespace (int .Values.store.service.port)) }}
{{- $_ := set $config "storeTokenSecret" (include "edgeloop.storeTokenSecret" .) }}
{{- if .Values.store.tls.enabled }}
{{- $_ := set $config "storeCaConfigMap" (include "edgeloop.storeCaConfigMap" .) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Namespaces that get the per-namespace objects, as a list. */}}
{{- define "edgeloop.workloadNamespaces" -}}
{{- toJson (default .Values.watchNamespaces .Values.workloadNamespaces | uniq) }}
{{- end }}

{{- define "edgeloop.storeTlsSecret" -}}
{{- printf "%s-store-tls" (include "edgeloop.fullname" .) }}
{{- end }}

{{- define "edgeloop.storeCaConfigMap" -}}
{{- printf "%s-store-ca" (include "edgeloop.fullname" .) }}
{{- end }}

{{- define "edgeloop.storeTokenSecret" -}}
{{- default (printf "%s-store-token" (include "edgeloop.fullname" .)) .Values.store.token.existingSecret }}
{{- end }}

{{/* The security context of every container in this chart: the Pod Security "restricted" level. */}}
{{- define "edgeloop.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "edgeloop.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* "true" when a Prometheus Operator object is rendered: (list <enabled value> <kind> $): enabled true, or auto
while the cluster serves monitoring.coreos.com/v1/<kind>. */}}
{{- define "edgeloop.prometheusOperator" -}}
{{- $enabled := toString (index . 0) }}
{{- $root := index . 2 }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" (index . 1)))) -}}
true
{{- end }}
{{- end }}

{{/* The runtime pods' metrics endpoint, for PodMonitors and ServiceMonitors. */}}
{{- define "edgeloop.runtimeEndpoint" -}}
port: http
path: /metrics
interval: {{ .interval }}
{{- if ne .root.Values.tls.mode "disabled" }}
scheme: https
tlsConfig:
  {{- toYaml .root.Values.monitoring.podMonitor.runtimeTLSConfig | nindent 2 }}
{{- end }}
{{- end }}

{{/* Namespaces whose runtime pods are scraped: the workload namespaces, or every one. */}}
{{- define "edgeloop.monitoredNamespaces" -}}
{{- $namespaces := include "edgeloop.workloadNamespaces" . | fromJsonArray }}
{{- if $namespaces -}}
matchNames: {{ toJson $namespaces }}
{{- else -}}
any: true
{{- end }}
{{- end }}
