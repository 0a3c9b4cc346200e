"""The baseline of ``serve_bench.py``: the 20-line server a user would write instead of imgpipe.

    python benchmarks/plain_server.py BUNDLE_DIR PORT

Plain FastAPI + uvicorn, one process, one sync handler (FastAPI runs it in its thread pool)
calling the same ``Predictor`` as the Serve app, answering the same top-k JSON. Nothing tuned:
this is what the issue measured against.
"""

from __future__ import annotations

import sys

import numpy as np
import uvicorn
from fastapi import Body, FastAPI, HTTPException

from imgpipe.data.transforms import ImageDecodeError
from imgpipe.inference import Predictor


def create_plain_app(bundle: str) -> FastAPI:
    app = FastAPI()
    predictor = Predictor.load(bundle)
    names = predictor.class_names

    @app.post("/v1/predict")
    def predict(body: bytes = Body(..., media_type="image/png"), top_k: int = 5) -> dict:
        try:
            probs = predictor.predict_images([body])[0]
        except ImageDecodeError as e:
            raise HTTPException(400, str(e)) from None
        order = np.argsort(-probs)[:top_k]
        return {"model_name": predictor.meta.name, "predictions": [{
            "label": names[int(order[0])],
            "top_k": [{"label": names[int(j)], "probability": float(probs[j])} for j in order]}]}

    return app


if __name__ == "__main__":
    uvicorn.run(create_plain_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning")
