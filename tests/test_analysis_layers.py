"""One resolution of "the first layer" and "the last block" for every surface."""
from analysis.layers import first_layer, last_block, logged_first_layer

LAYERS = ["patch_embed", "cls_token", "blocks.0", "blocks.11", "norm", "projector", "predictor"]


def test_the_last_block_is_a_transformer_block_not_a_head():
    assert last_block(None, LAYERS) == "blocks.11"
    assert last_block({"last_block": "encoder.layer.5"}, [*LAYERS, "encoder.layer.5"]) == "encoder.layer.5"
    assert last_block({"last_block": "blocks.23"}, LAYERS) == "blocks.11"  # meta names a layer not logged
    assert last_block(None, ["stem", "layer1", "fc"]) == "fc" and last_block(None, []) is None


def test_the_first_layer_is_the_model_s_even_when_it_is_not_logged():
    frozen = LAYERS[1:]  # a frozen patch projection logs no gradient
    assert first_layer({"first_layer": "embeddings"}) == "embeddings" and first_layer(None) == "patch_embed"
    assert logged_first_layer({}, LAYERS) == "patch_embed"
    assert logged_first_layer({}, frozen) == "cls_token" and logged_first_layer({}, []) is None
