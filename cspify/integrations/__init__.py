"""Integrations with host frameworks, each an optional module that imports its framework
only when used: ``cspify.integrations.ultralytics`` (training a converted YOLO with
ultralytics' own trainer), ``cspify.integrations.yolo_data`` (a small YOLO-format dataset
written offline, for a smoke test or a benchmark)."""
