{{/*
Labels of every object: the kustomize base's, plus the two Helm adds by convention.
Selectors and the Pod template use trellis.selectorLabels / the base's labels only, so
an upgrade of the chart never changes an immutable selector.
*/}}
{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis-control
app.kubernetes.io/part-of: trellis
{{ include "trellis.helmLabels" . }}
{{- end }}

{{- define "trellis.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis-control
{{- end }}

{{/* An image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "trellis.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end }}

{{/* The control plane's Service as injected proxies dial it. */}}
{{- define "trellis.serviceHost" -}}
trellis-control.{{ .Release.Namespace }}.svc
{{- end }}
