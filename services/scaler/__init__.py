"""The scaler service: replicas per model from Little's law, warm pools, scale-to-zero; Triton and KEDA actuators."""
