"""The example's model: a small transformer encoder that classifies token
sequences (embedding, learned positions, 2 encoder layers, mean pooling, a
linear head). Its weights come from a fixed seed, so every build of the
image and every CPU reference has the same model.

`python model.py OUT` writes the weights (a state dict) to OUT: the
Dockerfile runs it at build time, so the function loads a file in the image
and downloads nothing at run time.
"""
import sys

import torch
from torch import nn

SEED = 20261205
VOCAB = 1000
MAX_LEN = 128
WIDTH = 64
HEADS = 4
LAYERS = 2
CLASSES = 8


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(MAX_LEN, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, dim_feedforward=4 * WIDTH, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        """tokens: (batch, length) int64 -> logits: (batch, CLASSES) float32."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))


def build(weights=None):
    """The model in eval mode on the CPU: from `weights` (a state-dict file)
    when given, else from the seed."""
    torch.manual_seed(SEED)
    model = Classifier()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: model.py OUT")
    torch.save(build().state_dict(), sys.argv[1])
