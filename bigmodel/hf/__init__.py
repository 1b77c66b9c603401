"""bigmodel's encoder as a transformers model: `BigmodelConfig` and `BigmodelModel`, registered with AutoConfig and
AutoModel when this module is imported (it imports transformers, the optional `hf` extra; `import bigmodel` alone
does not).

    import bigmodel.hf  # registers the "bigmodel_encoder" model type
    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/")  # written by `bigmodel ckpt export-hf`; no trust_remote_code

A model with fusion none and the contrastive objective only exports to transformers' own CLIPModel instead, which
needs no import of bigmodel at all.
"""

from bigmodel.hf.modeling import BigmodelConfig, BigmodelModel, register

register()

__all__ = ["BigmodelConfig", "BigmodelModel"]
