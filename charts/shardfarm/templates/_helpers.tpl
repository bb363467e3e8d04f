{{- define "shardfarm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shardfarm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "shardfarm.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardfarm.labels" -}}
app.kubernetes.io/name: {{ include "shardfarm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "shardfarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardfarm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "shardfarm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shardfarm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shardfarm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* "true" when the monitoring object of kind (ServiceMonitor, PodMonitor or PrometheusRule)
is enabled in the values and the cluster serves monitoring.coreos.com/v1/<kind>; empty
otherwise. Called as (list $ kind). */}}
{{- define "shardfarm.monitor" -}}
{{- $ := index . 0 -}}
{{- $kind := index . 1 -}}
{{- $key := printf "%s%s" (lower (substr 0 1 $kind)) (substr 1 -1 $kind) -}}
{{- if and (index $.Values.monitoring $key).enabled ($.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) -}}
true
{{- end -}}
{{- end -}}

{{/* The monitoring objects enabled in the values whose kind the cluster does not serve. */}}
{{- define "shardfarm.skippedMonitors" -}}
{{- $out := list -}}
{{- range $kind := list "ServiceMonitor" "PodMonitor" "PrometheusRule" -}}
{{- $key := printf "%s%s" (lower (substr 0 1 $kind)) (substr 1 -1 $kind) -}}
{{- if and (index $.Values.monitoring $key).enabled (not (include "shardfarm.monitor" (list $ $kind))) -}}
{{- $out = append $out $kind -}}
{{- end -}}
{{- end -}}
{{- join ", " $out -}}
{{- end -}}
