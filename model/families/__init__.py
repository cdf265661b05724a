"""One module per VLM family, each with a `load(path, model_id, revision, device, dtype,
trust_remote_code) -> Backbone` that model.backbone.FAMILIES names (docs/MODELS.md)."""
