{{- define "shardfarm-pool.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "shardfarm-pool.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}


{{/* The pool's spec.clients: pool.clients, and with the gateway on, its root key `gateway` and
one `s3-<user>` per S3 user. A name listed twice fails the render (the API server would refuse
the list). */}}
{{- define "shardfarm-pool.clients" -}}
{{- $out := list }}
{{- $seen := dict }}
{{- range .Values.pool.clients }}
{{- $out = append $out (dict "name" .name "days" (default 365 .days | int)) }}
{{- end }}
{{- if .Values.gateway.enabled }}
{{- $days := .Values.gateway.clientDays | int }}
{{- /* The gateway's root key places and signs its namespace log: a new key cannot find the
       old log, so it gets the longest life there is (renewed only after eight years). */}}
{{- $out = append $out (dict "name" "gateway" "days" 3650) }}
{{- range .Values.gateway.users }}
{{- $out = append $out (dict "name" (printf "s3-%s" .name) "days" $days) }}
{{- end }}
{{- end }}
{{- range $out }}
{{- if hasKey $seen .name }}
{{- fail (printf "pool client %q is listed twice (the gateway adds `gateway` and `s3-<user>`)" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- if gt (len $out) 32 }}
{{- fail (printf "a pool takes at most 32 clients; these values make %d" (len $out)) }}
{{- end }}
{{- toYaml $out }}
{{- end -}}

{{- define "shardfarm-pool.gatewayName" -}}
{{- printf "shardfarm-gateway-%s" .Values.pool.name -}}
{{- end -}}

{{- define "shardfarm-pool.gatewayImage" -}}
{{- $repo := default .Values.image.repository .Values.gateway.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.gateway.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "shardfarm-pool.gatewaySelector" -}}
app.kubernetes.io/name: shardfarm-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
shardfarm.io/pool: {{ .Values.pool.name }}
{{- end -}}

{{/* users.toml of the gateway: one [[users]] table per S3 user, in the order of
gateway.users; user i's secret key and pool identity come from SHARDFARM_S3_SECRET_<i> and
SHARDFARM_S3_IDENTITY_<i>. */}}
{{- define "shardfarm-pool.gatewayUsers" -}}
# S3 users of shardfarm gateway (rendered by the shardfarm-pool chart).
{{- range $i, $u := .Values.gateway.users }}

# user {{ $u.name }} (pool client s3-{{ $u.name }})
[[users]]
access_key = {{ $u.accessKey | toJson }}
secret_key_env = "SHARDFARM_S3_SECRET_{{ $i }}"
identity_env = "SHARDFARM_S3_IDENTITY_{{ $i }}"
{{- else }}
users = []
{{- end }}
{{ end -}}
