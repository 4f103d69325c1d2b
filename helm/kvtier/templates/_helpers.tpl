{{/* Object-name prefix: "<release>-kvtier", at most 40 characters (KubeRay derives longer names from it). */}}
{{- define "kvtier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (default "kvtier" .Values.nameOverride) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvtier.labels" -}}
app.kubernetes.io/name: {{ default "kvtier" .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvtier.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* Labels KubeRay puts on the pods of this RayCluster: the head, or the worker group. */}}
{{- define "kvtier.headSelector" -}}
ray.io/cluster: {{ include "kvtier.fullname" . }}
ray.io/node-type: head
{{- end -}}
{{- define "kvtier.workerSelector" -}}
ray.io/cluster: {{ include "kvtier.fullname" . }}
ray.io/group: gpu-workers
{{- end -}}

{{- define "kvtier.redisSecretName" -}}
{{- default (printf "%s-redis" (include "kvtier.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* Whether pods need the Redis password mounted. */}}
{{- define "kvtier.redisAuth" -}}
{{- if and (ne .Values.redis.mode "none") .Values.redis.auth.enabled }}true{{ end -}}
{{- end -}}

{{- define "kvtier.redisUrl" -}}
{{- if eq .Values.redis.mode "bundled" -}}
redis://{{ include "kvtier.fullname" . }}-redis:6379/0
{{- else if eq .Values.redis.mode "external" -}}
{{ .Values.redis.external.url }}
{{- end -}}
{{- end -}}

{{/*
The kvtier config, in the exact schema `cluster.config.load_config` reads (nested keys, snake_case).
Mounted files: /etc/kvtier/redis-auth/password, /etc/kvtier/redis-ca/ca.crt, /etc/kvtier/tls/*, /etc/kvtier/auth/tokens.yaml
*/}}
{{- define "kvtier.config" -}}
{{- $v := .Values -}}
{{- $cache := dict "block_size" ($v.engine.blockSize | int) "memory" ($v.engine.kvCacheMemory | toString) -}}
{{- $scheduler := dict "max_num_seqs" ($v.engine.maxNumSeqs | int) "max_num_batched_tokens" ($v.engine.maxNumBatchedTokens | int) -}}
{{- $engine := dict "model" $v.model.name "dtype" $v.model.dtype "device" "auto" "tensor_parallel_size" ($v.workers.tensorParallelSize | int) "attention_backend" $v.engine.attentionBackend "cuda_graphs" $v.engine.cudaGraphs "cuda_graph_max_batch" ($v.engine.cudaGraphMaxBatch | int) "collective_timeout_s" $v.engine.collectiveTimeoutSeconds "rank_start_timeout_s" $v.engine.rankStartTimeoutSeconds "cache" $cache "scheduler" $scheduler -}}
{{- if $v.model.maxModelLen }}{{ $_ := set $engine "max_model_len" ($v.model.maxModelLen | int) }}{{ end -}}
{{- $redis := dict -}}
{{- if ne $v.redis.mode "none" -}}
{{- $redis = dict "url" (include "kvtier.redisUrl" .) "cluster" (and (eq $v.redis.mode "external") $v.redis.external.cluster) -}}
{{- if $v.redis.auth.enabled }}{{ $_ := set $redis "password_file" "/etc/kvtier/redis-auth/password" }}{{ end -}}
{{- if and (eq $v.redis.mode "external") $v.redis.auth.username }}{{ $_ := set $redis "username" $v.redis.auth.username }}{{ end -}}
{{- if and (eq $v.redis.mode "external") $v.redis.external.cluster $v.redis.external.clusterNodes }}{{ $_ := set $redis "cluster_nodes" $v.redis.external.clusterNodes }}{{ end -}}
{{- if and (eq $v.redis.mode "external") $v.redis.external.caSecretName }}{{ $_ := set $redis "ca_file" "/etc/kvtier/redis-ca/ca.crt" }}{{ end -}}
{{- if $v.redis.ttlSeconds }}{{ $_ := set $redis "ttl_s" ($v.redis.ttlSeconds | int) }}{{ end -}}
{{- $_ := set $redis "refresh_s" $v.redis.refreshSeconds -}}
{{- $readers := $v.redis.readParallelism | int -}}
{{- $threads := $v.redis.prefetchThreads | int -}}
{{- $_ := set $redis "read_parallelism" $readers -}}
{{- $_ := set $redis "prefetch_threads" $threads -}}
{{- $_ := set $redis "max_connections" (max 8 (add1 (mul $readers $threads))) -}}
{{- $_ := set $redis "staging_memory" $v.redis.stagingMemory -}}
{{- $_ := set $redis "socket_timeout_s" $v.redis.socketTimeoutSeconds -}}
{{- $_ := set $redis "connect_timeout_s" $v.redis.connectTimeoutSeconds -}}
{{- $_ := set $redis "write_queue_blocks" ($v.redis.writeQueueBlocks | int) -}}
{{- $_ := set $redis "compute_while_reading" $v.redis.computeWhileReading -}}
{{- end -}}
{{- $kvstore := dict "prefix_caching" $v.engine.prefixCaching "cost_model" $v.engine.costModel "cpu" (dict "enabled" $v.workers.cpuTier.enabled "capacity" $v.workers.cpuTier.capacity) "redis" $redis -}}
{{- $workers := dict "count" ($v.workers.replicas | int) "num_cpus" 1 "num_gpus" ($v.workers.tensorParallelSize | int) "host" "node_ip" "max_restarts" -1 -}}
{{- $tls := dict -}}
{{- if $v.router.tls.enabled -}}
{{- $tls = dict "cert_file" "/etc/kvtier/tls/tls.crt" "key_file" "/etc/kvtier/tls/tls.key" -}}
{{- if $v.router.tls.requireClientCert }}{{ $_ := set $tls "client_ca_file" "/etc/kvtier/tls/ca.crt" }}{{ end -}}
{{- end -}}
{{- $auth := dict -}}
{{- if $v.router.auth.enabled }}{{ $auth = dict "tokens_file" "/etc/kvtier/auth/tokens.yaml" }}{{ end -}}
{{- $router := dict "host" "0.0.0.0" "port" ($v.router.port | int) "health_port" ($v.probes.healthPort | int) "policy" $v.router.policy "max_in_flight" ($v.router.maxInFlight | int) "stall_timeout_s" $v.router.stallTimeoutSeconds "drain_timeout_s" ($v.router.drainTimeoutSeconds | int) "tls" $tls "auth" $auth -}}
{{- if $v.metrics.enabled }}{{ $_ := set $router "metrics_port" ($v.metrics.port | int) }}{{ end -}}
{{- if not (kindIs "invalid" $v.router.minPriority) }}{{ $_ := set $router "min_priority" ($v.router.minPriority | int64) }}{{ end -}}
{{- $ray := dict "address" "auto" "namespace" "kvtier" "connect_timeout_s" ($v.ray.connectTimeoutSeconds | int) "auth" (ternary "token" "disabled" $v.ray.auth.enabled) -}}
{{- toYaml (dict "engine" $engine "kvstore" $kvstore "workers" $workers "router" $router "ray" $ray) -}}
{{- end -}}

{{/* Volumes every kvtier container needs: the config, /dev/shm, the Redis password and CA. */}}
{{- define "kvtier.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "kvtier.fullname" . }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.workers.shmSize }}
- name: tmp
  emptyDir: {}
{{- if include "kvtier.redisAuth" . }}
- name: redis-auth
  secret:
    secretName: {{ include "kvtier.redisSecretName" . }}
    items:
      - key: {{ .Values.redis.auth.passwordKey }}
        path: password
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecretName }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.caSecretName }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}

{{- define "kvtier.commonMounts" -}}
- name: config
  mountPath: /etc/kvtier/config
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if include "kvtier.redisAuth" . }}
- name: redis-auth
  mountPath: /etc/kvtier/redis-auth
  readOnly: true
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecretName }}
- name: redis-ca
  mountPath: /etc/kvtier/redis-ca
  readOnly: true
{{- end }}
{{- end -}}
