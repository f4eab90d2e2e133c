"""Recipe schema: mergekit's YAML plus composer's depth sugar, validated strictly before any work starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from composer.errors import RecipeError
from composer.recipe_errors import describe, fail, suggest, yaml_error
from composer.recipe_limits import check_limits

from composer.methods import METHODS as _METHODS  # the registry: importing it does not import torch

MERGE_METHODS = tuple(_METHODS)
SUPPORTED_METHODS = ("passthrough", *MERGE_METHODS)
# Methods of other mergekit versions and forks that composer knows by name but does not run: refused by name.
KNOWN_UNSUPPORTED_METHODS = ("core_space", "goliath", "ram_ties")


def method_parameters(method: str) -> tuple[str, ...]:
    """The parameter names a method takes, as mergekit names them."""
    if method == "passthrough":
        return ("scale",)
    return tuple(sorted(_METHODS[method].parameters))
DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilteredValue(_Strict):
    """One entry of a `[{filter, value}]` parameter list; the first entry whose filter is in the tensor name wins."""

    value: Union[Scalar, list[Scalar]]
    filter: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_pattern(cls, data: Any) -> Any:
        # mergekit 0.1.5 drops an unknown `pattern:` and applies the entry to every tensor: never what was meant
        if isinstance(data, dict) and "pattern" in data:
            raise ValueError("'pattern:' is mergekit's old spelling, which mergekit 0.1.5 ignores (the entry then "
                             "applies to every tensor): write 'filter:' instead")
        return data


ParameterValue = Union[Scalar, list[Scalar], list[FilteredValue], FilteredValue]
Parameters = dict[StrictStr, ParameterValue]


class SourceSlice(_Strict):
    model: StrictStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _range_forward(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range [{start}, {end}] is empty or reversed: it is [start, end) with 0 <= start < end"
            )
        return value


class OutputSlice(_Strict):
    sources: list[SourceSlice]
    base_model: StrictStr | None = None
    residual_weight: StrictFloat | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_or_more(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        return self


class ModelEntry(_Strict):
    model: StrictStr
    parameters: Parameters | None = None


class BlockExpansion(_Strict):
    """LLaMA Pro: insert a zero-output copy after every `every`-th layer, or grow to `num_layers` layers."""

    model: StrictStr
    num_layers: StrictInt | None = None
    every: StrictInt | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BlockExpansion:
        if (self.num_layers is None) == (self.every is None):
            raise ValueError("give exactly one of num_layers (the target depth) or every (a copy every n layers)")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every={self.every} must be at least 1")
        return self


class Interleave(_Strict):
    """Goliath-style stacking: windows of `window` layers, taken from each model in turn, overlapping by `overlap`."""

    models: list[StrictStr]
    window: StrictInt
    overlap: StrictInt = 0

    @model_validator(mode="after")
    def _sane(self) -> Interleave:
        if len(self.models) < 2:
            raise ValueError("interleave needs at least two models")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be at least 1")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap={self.overlap} must be at least 0 and less than window={self.window}")
        return self


class Module(_Strict):
    """One module of a multimodal model (mergekit's `modules:` entry): its own slices or models, and parameters."""

    slices: list[OutputSlice] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Module:
        if (self.slices is None) == (self.models is None):
            raise ValueError("a module needs exactly one of slices or models")
        return self


class ModelToken(_Strict):
    """A `tokens:` source that is one model's row for a token (by string, in that model's tokenizer) or by id."""

    kind: Literal["model_token"]
    model: StrictStr
    token_id: StrictInt | None = None
    token: StrictStr | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source takes exactly one of token or token_id")
        return self


class ZeroToken(_Strict):
    kind: Literal["zero"]


class TokenSource(_Strict):
    """Where one token's embedding comes from (mergekit's TokenEmbeddingConfig): a model, a model's token, or zeros;
    `force` applies it even to models that have the token."""

    source: Union[ModelToken, ZeroToken, StrictStr, None] = None
    force: StrictBool = False


class TokenizerSpec(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary (union, base or a model's), per-token embedding sources,
    and padding of the vocabulary size."""

    source: StrictStr = "union"
    tokens: dict[StrictStr, TokenSource] | None = None
    pad_to_multiple_of: StrictInt | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"pad_to_multiple_of={value} must be at least 1")
        return value


class Recipe(_Strict):
    name: StrictStr | None = None  # names a stage of a multi-document recipe, for later stages to use as a model
    merge_method: StrictStr | None = None
    slices: list[OutputSlice] | None = None
    models: list[ModelEntry] | None = None
    block_expansion: BlockExpansion | None = None
    interleave: Interleave | None = None
    base_model: StrictStr | None = None
    dtype: StrictStr | None = None
    out_dtype: StrictStr | None = None
    tokenizer_source: StrictStr | None = None
    parameters: Parameters | None = None
    modules: dict[StrictStr, Module] | None = None  # multimodal models: one recipe body per module
    tokenizer: TokenizerSpec | None = None
    chat_template: StrictStr | None = None  # "auto", a built-in name (composer.templates) or a Jinja template

    def module(self, name: str) -> Recipe:
        """The recipe of one module: its slices or models and parameters (over the global ones), the rest shared."""
        module = self.modules[name]
        parameters = {**(self.parameters or {}), **(module.parameters or {})} or None
        return self.model_copy(update=dict(modules=None, slices=module.slices, models=module.models,
                                           parameters=parameters))

    @property
    def form(self) -> str:
        if self.modules is not None:
            return "modules"
        for key in ("slices", "models", "block_expansion", "interleave"):
            if getattr(self, key) is not None:
                return key
        raise AssertionError("validated recipes have a form")

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in the order it names them, without repeats."""
        names: list[str] = []
        if self.slices:
            names += [s.model for sl in self.slices for s in sl.sources]
            names += [sl.base_model for sl in self.slices if sl.base_model]
        if self.models:
            names += [m.model for m in self.models]
        if self.block_expansion:
            names.append(self.block_expansion.model)
        if self.interleave:
            names += self.interleave.models
        for name in self.modules or {}:
            names += self.module(name).referenced_models()
        if self.base_model:
            names.append(self.base_model)
        source = self.vocabulary_source
        if source is not None and source not in ("base", "union"):
            names.append(source)
        return list(dict.fromkeys(names))

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from: `tokenizer.source` or `tokenizer_source` (None: the base's,
        unaligned)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source


def _check_parameters(params: Parameters | None, allowed: tuple[str, ...], method: str) -> tuple[str, str] | None:
    for name in params or {}:
        if name not in allowed:
            hint = suggest(name, allowed)
            ok = ", ".join(allowed) or "none"
            return name, f"unknown parameter '{name}' for merge_method {method} (it takes: {ok}){hint}"
    return None


def _semantic_checks(recipe: Recipe) -> tuple[tuple[Any, ...], str] | None:
    """Checks that need the whole recipe; returns (location, message) of the first problem."""
    forms = [k for k in ("slices", "models", "block_expansion", "interleave") if getattr(recipe, k) is not None]
    if recipe.modules is not None:
        if forms:
            return (forms[0],), f"with modules, each module has its own slices or models: move '{forms[0]}' into one"
        if not recipe.modules:
            return ("modules",), "modules is empty: name at least one module (for example text_decoder)"
        if not recipe.base_model:
            return ("modules",), "a recipe with modules needs base_model: the model whose other tensors it keeps"
        for name in recipe.modules:
            problem = _semantic_checks(recipe.module(name))
            if problem:
                return ("modules", name, *problem[0]), problem[1]
        return None
    if len(forms) != 1:
        return (), (
            "give exactly one of slices, models, block_expansion or interleave"
            + (f" (found {', '.join(forms)})" if forms else "")
        )
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        return ("tokenizer_source",), ("give tokenizer_source or a tokenizer block, not both (as mergekit): "
                                       "move it into tokenizer.source")
    if recipe.chat_template is not None:
        from composer.templates import template_problem

        problem = template_problem(recipe.chat_template)
        if problem:
            return ("chat_template",), problem
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            return (key,), f"unknown {key} '{value}'{suggest(value, list(DTYPES))} (use bfloat16, float16 or float32)"
    method = recipe.merge_method
    if recipe.form in ("slices", "models"):
        if method is None:
            return (), f"missing required key 'merge_method' (one of: {', '.join(SUPPORTED_METHODS)})"
    if method is not None and method not in SUPPORTED_METHODS:
        if method in KNOWN_UNSUPPORTED_METHODS:
            return ("merge_method",), (
                f"merge_method '{method}' is not supported yet (composer runs: {', '.join(SUPPORTED_METHODS)})"
            )
        return ("merge_method",), (
            f"unknown merge_method '{method}'{suggest(method, [*SUPPORTED_METHODS, *KNOWN_UNSUPPORTED_METHODS])}"
        )
    if recipe.form in ("block_expansion", "interleave") and method not in (None, "passthrough"):
        return ("merge_method",), f"{recipe.form} is a passthrough operation: drop merge_method or set it to passthrough"
    if recipe.form in ("block_expansion", "interleave") and recipe.parameters is not None:
        return ("parameters",), f"parameters do not apply to {recipe.form}: write the recipe as slices to scale tensors"
    be = recipe.block_expansion
    if be is not None and recipe.base_model not in (None, be.model):
        return ("base_model",), f"block_expansion takes its config from '{be.model}': drop base_model"
    allowed = method_parameters(method or "passthrough")
    places: list[tuple[tuple[Any, ...], Parameters | None]] = [(("parameters",), recipe.parameters)]
    for i, sl in enumerate(recipe.slices or []):
        if sl.residual_weight is not None:
            return ("slices", i, "residual_weight"), "residual_weight is not supported: remove it"
        places.append((("slices", i, "parameters"), sl.parameters))
        places += [(("slices", i, "sources", j, "parameters"), s.parameters) for j, s in enumerate(sl.sources)]
    places += [(("models", i, "parameters"), m.parameters) for i, m in enumerate(recipe.models or [])]
    for loc, params in places:
        bad = _check_parameters(params, allowed, method or "passthrough")
        if bad:
            return (*loc, bad[0]), bad[1]
    if recipe.form == "models" and method == "passthrough" and len(recipe.models or []) != 1:
        return ("models",), "passthrough takes exactly one model in 'models' (use slices to stack several)"
    for i, sl in enumerate(recipe.slices or []):
        if method == "passthrough" and len(sl.sources) != 1:
            return ("slices", i, "sources"), "passthrough takes exactly one source per slice: split it into slices"
    for name in recipe.referenced_models():
        if name.count("+") > 1 or name.startswith("+") or name.endswith("+"):
            return (), f"model '{name}' is not MODEL or MODEL+ADAPTER (one '+' joins a model and a LoRA adapter)"
        if any(part.count("@") > 1 for part in name.split("+")):
            return (), f"model '{name}' has more than one '@revision' in a part: write org/name@revision"
    return None


def _validate(data: Any, node: yaml.Node, path: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (merge_method, slices, ...), not {type(data).__name__}")
    schema = Recipe
    if "experts" in data:  # a mergekit-moe config: a mixture of experts from dense models (composer.moe)
        from composer.moe import MoeRecipe

        schema = MoeRecipe
    try:
        recipe = schema.model_validate(data)
    except ValidationError as exc:
        # A typo shows up twice (an unknown key and a missing one): name the typo, which carries the fix.
        # A validator's own message (a value_error) beats the alternatives a union lists for the same value.
        errors = sorted(exc.errors(), key=lambda e: (e["type"] != "extra_forbidden", e["type"] != "value_error"))
        loc, message = describe(schema, errors[0])
        raise fail(path, node, loc, message, len(errors) - 1) from None
    if schema is not Recipe:
        return recipe
    problem = _semantic_checks(recipe)
    if problem:
        raise fail(path, node, *problem)
    return recipe


def parse_recipes(text: str, path: str = "<recipe>") -> list[tuple[Recipe, str]]:
    """Validate a recipe of one or more YAML documents (`---`); returns each recipe with its own text.

    In a multi-document recipe every document but the last needs a `name`, which later documents can use as
    a model; names are unique.
    """
    check_limits(text, path)  # before composing: the composer recurses and expands nothing lazily
    try:
        nodes = [n for n in yaml.compose_all(text) if n is not None and n.tag != "tag:yaml.org,2002:null"]
    except yaml.YAMLError as exc:
        raise yaml_error(exc, path) from None
    if not nodes:
        raise RecipeError(f"{path}: the recipe is empty")
    out, names = [], set()
    for k, node in enumerate(nodes):
        doc_text = text[node.start_mark.index: node.end_mark.index].strip() + "\n"
        try:
            data = yaml.safe_load(doc_text)
        except yaml.YAMLError as exc:
            raise yaml_error(exc, path) from None
        recipe = _validate(data, node, path)
        last = k == len(nodes) - 1
        if len(nodes) > 1 and not last and not recipe.name:
            raise fail(path, node, (), "every document of a multi-document recipe but the last needs a name, "
                        "which later documents use as a model")
        if recipe.name is not None:
            if recipe.name in names or "/" in recipe.name or not recipe.name.strip(". "):
                raise fail(path, node, ("name",), f"name '{recipe.name}' is used twice or is not a folder name")
            names.add(recipe.name)
        out.append((recipe, doc_text if len(nodes) > 1 else text))
    return out


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Validate single-document recipe text; every problem is a RecipeError naming the file, line, key and fix."""
    recipes = parse_recipes(text, path)
    if len(recipes) > 1:
        raise RecipeError(f"{path}: has {len(recipes)} documents: load it with load_recipes")
    return recipes[0][0]


def read_recipe_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from None


def load_recipes(path: str | Path) -> list[tuple[Recipe, str]]:
    return parse_recipes(read_recipe_text(path), str(path))


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_text(path), str(path))
