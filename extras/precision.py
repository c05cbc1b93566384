"""A mixed-precision model rebuilt in float32, for export.py: bfloat16 / float16 graphs do not
convert to TFLite, and phones run float32 / int8 anyway. export.py brings this module in only when
the model it loads has a mixed-precision layer (train.py's default on a GPU or TPU); a model trained
on a CPU is float32 already and never needs it.
"""


def float32_copy(model):
    """The same architecture with every mixed-precision dtype policy replaced by float32, same
    weights. Variables of a mixed-precision model are already float32, so set_weights copies them
    exactly."""

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and \
                    str(node.get("config", {}).get("name", "")).startswith("mixed_"):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return "float32" if isinstance(node, str) and node.startswith("mixed_") else node

    clone = model.__class__.from_config(walk(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone
