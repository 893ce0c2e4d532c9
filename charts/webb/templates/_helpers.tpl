{{/* The namespace is Webb's own (mesh.model.SYSTEM_NAMESPACE): node reports and the node proxy identity live there. */}}
{{- define "webb.namespace" -}}
{{- if ne .Release.Namespace "webb-system" -}}
{{- fail (printf "install Webb into the namespace webb-system (--namespace webb-system --create-namespace), not %q: the agent and the operator use it by name" .Release.Namespace) -}}
{{- end -}}
webb-system
{{- end -}}

{{- define "webb.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "webb.labels" -}}
app.kubernetes.io/part-of: webb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "webb.caSecret" -}}
{{ .Values.ca.existingSecret | default "webb-ca" }}
{{- end -}}

{{/* Without kube-proxy a pod reaches the API server's ClusterIP only once the agent serves it: this address first. */}}
{{- define "webb.apiServerEnv" -}}
- {name: KUBERNETES_SERVICE_HOST, value: {{ .Values.apiServer.host | quote }}}
- {name: KUBERNETES_SERVICE_PORT, value: {{ required "apiServer.port goes with apiServer.host" .Values.apiServer.port | toString | quote }}}
{{- end -}}

{{/* The agent's status file (written every 0.5 s): an exec probe that reads it, without importing Webb.
     Fresh (younger than $age seconds), running, and with "ready" a plan applied. */}}
{{- define "webb.statusProbe" -}}
exec:
  command:
  - python3
  - -c
  - |
    import json, os, sys, time
    p = "/run/webb/status.json"
    s = json.load(open(p))
    ok = time.time() - os.stat(p).st_mtime < {{ .age }} and s.get("running"){{ if .ready }} and (s.get("applied") or {}).get("plan_version"){{ end }}
    sys.exit(0 if ok else 1)
{{- end -}}
