"""edgelm-runtime: run edgelm bundles with onnxruntime, tokenizers, numpy and jinja2 only.

    import edgelm_runtime as er
    llm = er.load_bundle("dist/smollm2-cpu-int8")
    text = llm.generate("Once upon a time", temperature=0.7, top_p=0.9, seed=0, stop=["\\n\\n"])
    vectors = er.load_bundle("dist/minilm-cpu-fp32").embed(["first text", "second"])  # an encoder bundle"""

from edgelm_runtime.bundle import FORMAT_VERSION, Manifest, read_manifest, verify_bundle
from edgelm_runtime.encoder import EncoderModel, Entity
from edgelm_runtime.errors import BundleError, EdgelmRuntimeError, GenerationError, InputError, TemplateError
from edgelm_runtime.examples import NearestExamples
from edgelm_runtime.generate import GenerationStats
from edgelm_runtime.model import LanguageModel, load_bundle
from edgelm_runtime.prompts import Classification, PromptTemplate
from edgelm_runtime.sampling import SamplingParams

__all__ = [
    "FORMAT_VERSION",
    "BundleError",
    "Classification",
    "EdgelmRuntimeError",
    "EncoderModel",
    "Entity",
    "GenerationError",
    "GenerationStats",
    "InputError",
    "LanguageModel",
    "NearestExamples",
    "Manifest",
    "PromptTemplate",
    "SamplingParams",
    "TemplateError",
    "load_bundle",
    "read_manifest",
    "verify_bundle",
]
