# A Triton model-group image: NVIDIA's NGC Triton image for the group's backend, by tag, run as its
# non-root user. It builds no engine and holds no weights: the model repository comes from a volume
# (a PersistentVolumeClaim or an OCI image volume, see the chart's triton.modelGroups[].repository), and
# the chart writes the vLLM configurations and the TensorRT-LLM ensemble's into a ConfigMap.
#   docker build -f deploy/docker/triton.Dockerfile --build-arg TRITON_TAG=25.01-vllm-python-py3 .
#   docker build -f deploy/docker/triton.Dockerfile --build-arg TRITON_TAG=25.01-trtllm-python-py3 .
# The chart uses the NGC image directly (triton.image, modelGroups[].imageTag); build this one only to
# add something of your own (certificates, a python-backend model's packages) on top.
ARG TRITON_TAG=25.01-vllm-python-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
# The NGC images ship the `triton-server` user (uid 1000), which the chart's securityContext runs as.
USER 1000:1000
ENV HOME=/tmp
EXPOSE 8000 8001 8002
# NGC's entrypoint stays: the chart's args start with `tritonserver`, as this default does.
CMD ["tritonserver", "--model-repository=/models", "--model-repository=/etc/triton/repository"]
