"""Models on this node: fetching them into models_dir before an engine starts (docs/models.md).

``hub`` is the only module that talks to the hub's API (through huggingface_hub, off the
event loop); ``layout`` knows the files on disk (the hub cache engines read with
``HF_HOME=/models``) and what models_dir holds; ``download`` fetches files over HTTP with
Range, verification and a bandwidth bound; ``lock`` keeps agents that share a models_dir
from fetching the same model twice; ``manager`` ties them together for the supervisor.
"""
