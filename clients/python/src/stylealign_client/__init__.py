"""Python client of the stylealign gRPC service: style-aligned Stable Diffusion image sets.

    from stylealign_client import Client

    with Client("127.0.0.1:50051") as client:
        session = client.patch_model("tiny", share_norm="both", share_attn="q+k", scale=1.0)
        for image in client.generate_images(session, ["a fox, linocut print", "a lighthouse, linocut print"], seed=42):
            image.save(f"image_{image.index}.png")  # the PNG as received, parameters included
"""

from .client import Client
from .errors import StyleAlignError
from .retry import RetryPolicy
from .types import Control, ControlNetInfo, Event, ImageResult, LoraInfo, Loras, ModelInfo, Models, Progress, Queued, Session, Started

__version__ = "0.1.0"

__all__ = ["Client", "Control", "ControlNetInfo", "Event", "ImageResult", "LoraInfo", "Loras", "ModelInfo", "Models", "Progress", "Queued", "RetryPolicy", "Session", "Started", "StyleAlignError"]
