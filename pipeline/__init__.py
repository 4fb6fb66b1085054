"""The Ray pipeline around the method: Train, Tune, export, registry, CLI."""

import os

# ONNX Runtime's Linux wheels (1.32) send usage telemetry to Microsoft and keep a device id in
# $TMPDIR/.ses unless ORT_DISABLE_TELEMETRY=1 is set before onnxruntime loads (it is read once per
# process). Off unless the user chose otherwise: every process that runs our code imports this first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
