"""casa: an in-model safety layer for (multimodal) language models (CASA, arXiv 2604.00310).

    import casa_cli
    casa = casa_cli.load()                                   # embedded default + adapter
    records = list(casa.classify([casa_cli.prompt_sample("How do I pick a lock?")]))
    answer = casa.generate("How do I pick a lock?")       # .text, .verdict, .p_unsafe, .timings
    adapter = casa_cli.train("path/to/model", limit=50)      # an Adapter; .save(directory)
    report = casa_cli.evaluate("eval/", sets=["harmbench"])  # a Report: .metrics, .paths

Imports stay lazy so that `casa --help` does not pay for torch.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "load": "casa_cli.pipeline",
    "Casa": "casa_cli.pipeline",
    "train": "casa_cli.recipes",
    "TrainOptions": "casa_cli.training",
    "Adapter": "casa_cli.adapter",
    "evaluate": "casa_cli.evaluation",
    "Report": "casa_cli.report",
    "generate": "casa_cli.decoding",
    "DecodeOptions": "casa_cli.decoding",
    "Sample": "casa_cli.inputs",
    "prompt_sample": "casa_cli.inputs",
    "read_manifest": "casa_cli.inputs",
    "read_folder": "casa_cli.inputs",
    "InputError": "casa_cli.inputs",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'casa_cli' has no attribute {name!r}")
