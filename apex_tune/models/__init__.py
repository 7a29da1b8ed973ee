"""Model builders for torchtune configs (``_component_: apex_tune.models.apex_model``)."""

from apex_tune.models.builders import apex_model
from apex_tune.models.smollm2 import ChatMLTokenizer, smollm2_135m, smollm2_tokenizer

__all__ = ["ChatMLTokenizer", "apex_model", "smollm2_135m", "smollm2_tokenizer"]
