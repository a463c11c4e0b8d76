{{- define "outbox-operator.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-operator.labels" -}}
app.kubernetes.io/name: outbox-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "outbox-operator.selector" -}}
app.kubernetes.io/name: outbox-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outbox-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "outbox-operator.relayImage" -}}
{{- printf "%s:%s" .Values.relayImage.repository (default .Chart.AppVersion .Values.relayImage.tag) -}}
{{- end -}}
