"""The shape every tiny model shares (tiny.py's text models and tiny_vision.py's text model): head_dim 64, as
vLLM's CPU attention accepts. Its own module so that both builders import it and neither imports the other."""

HIDDEN, LAYERS, HEADS, HEAD_DIM, MAX_POSITIONS = 128, 2, 2, 64, 2048
