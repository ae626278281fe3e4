{{/* Model configurations that the chart writes for Triton (the rest of a repository lives on its volume). */}}

{{/* vLLM backend: text_input, stream, sampling_parameters -> text_output. (dict "model" M) */}}
{{- define "constellation.vllmConfig" -}}
# {{ .model.name }}: Triton's vLLM backend (weights under /models/{{ .model.path }}).
name: "{{ .model.name }}"
backend: "vllm"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "sampling_parameters", data_type: TYPE_STRING, dims: [ 1 ], optional: true },
  { name: "exclude_input_in_output", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }
]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] }
]
instance_group [ { count: 1, kind: KIND_MODEL } ]
{{- end -}}

{{/* vLLM's engine arguments (model.json); max_model_len only when set: vLLM reads it from the model otherwise. */}}
{{- define "constellation.vllmModelJson" -}}
{{- $args := dict "model" (printf "/models/%s" .model.path) "disable_log_requests" true "gpu_memory_utilization" (.model.gpuMemoryUtilization | default 0.9) "tensor_parallel_size" (.gpus | default 1) -}}
{{- with .model.maxModelLen }}{{ $_ := set $args "max_model_len" . }}{{ end -}}
{{- toJson $args -}}
{{- end -}}

{{/* TensorRT-LLM: the ensemble's convention, text_input, max_tokens, stream -> text_output. Its steps
     <model>_preprocessing, <model>_tensorrt_llm and <model>_postprocessing come from the repository volume. */}}
{{- define "constellation.trtllmEnsembleConfig" -}}
{{- $m := .model.name -}}
# {{ $m }}: TensorRT-LLM ensemble (steps {{ $m }}_preprocessing, {{ $m }}_tensorrt_llm, {{ $m }}_postprocessing on /models).
name: "{{ $m }}"
platform: "ensemble"
max_batch_size: 0
input [
  { name: "text_input", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "max_tokens", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true },
  { name: "temperature", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "top_p", data_type: TYPE_FP32, dims: [ 1 ], optional: true },
  { name: "stop_words", data_type: TYPE_STRING, dims: [ -1 ], optional: true }
]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "{{ $m }}_preprocessing"
      model_version: -1
      input_map { key: "QUERY" value: "text_input" }
      input_map { key: "REQUEST_OUTPUT_LEN" value: "max_tokens" }
      input_map { key: "STOP_WORDS_DICT" value: "stop_words" }
      output_map { key: "INPUT_ID" value: "_input_ids" }
      output_map { key: "REQUEST_INPUT_LEN" value: "_input_lengths" }
      output_map { key: "REQUEST_OUTPUT_LEN" value: "_request_output_len" }
      output_map { key: "STOP_WORDS_IDS" value: "_stop_words_ids" }
      output_map { key: "OUT_END_ID" value: "_end_id" }
      output_map { key: "OUT_PAD_ID" value: "_pad_id" }
    },
    {
      model_name: "{{ $m }}_tensorrt_llm"
      model_version: -1
      input_map { key: "input_ids" value: "_input_ids" }
      input_map { key: "input_lengths" value: "_input_lengths" }
      input_map { key: "request_output_len" value: "_request_output_len" }
      input_map { key: "stop_words_list" value: "_stop_words_ids" }
      input_map { key: "end_id" value: "_end_id" }
      input_map { key: "pad_id" value: "_pad_id" }
      input_map { key: "streaming" value: "stream" }
      input_map { key: "temperature" value: "temperature" }
      input_map { key: "runtime_top_p" value: "top_p" }
      output_map { key: "output_ids" value: "_output_ids" }
      output_map { key: "sequence_length" value: "_sequence_length" }
    },
    {
      model_name: "{{ $m }}_postprocessing"
      model_version: -1
      input_map { key: "TOKENS_BATCH" value: "_output_ids" }
      input_map { key: "SEQUENCE_LENGTH" value: "_sequence_length" }
      output_map { key: "OUTPUT" value: "text_output" }
    }
  ]
}
{{- end -}}
