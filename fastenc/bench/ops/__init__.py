"""One module per benchmark suite; importing this package registers them, in this order."""
from . import attention, layer_norm, ffn, layer, encoder, train, e2e, overhead, modernbert  # noqa: F401
