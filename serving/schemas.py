"""Typed request and response bodies of the service (pydantic): the endpoints and the OpenAPI document.

Requests: each route's ``@bentoml.api(input_spec=...)`` is one of the ``*Request`` models below, so the
body BentoML validates and the body ``/docs.json`` documents are the same model. Range limits that are
configurable (``FLATPROMPT_MAX_*``) are checked by the service, not here, so that every violation answers
the service's own error codes (``invalid_top_k``, ``too_many_images``, ...); the descriptions name them.

Returning a pydantic model (not ``dict[str, Any]``) also lets BentoML answer with ``application/json``
without deriving a JSON schema on every response (measured: 13% of the event loop's time at
concurrency 32 with ``dict`` returns). The hot path builds them with ``model_construct`` (no
re-validation of values the service computed itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from serving.examples import (
    BUNDLE_EXAMPLE,
    REGISTERED_EXAMPLES,
    SAMPLE_IMAGE_BASE64,
    TEMPLATE_EXAMPLES,
    TRAINED_EXAMPLES,
)

Kind = Literal["trained", "registered"]
RegistrationStatus = Literal["created", "updated", "unchanged", "trained"]

_BUNDLE = Field(description="first 16 hex digits of the bundle's manifest sha256", examples=[BUNDLE_EXAMPLE])
_VERSION_DESC = "registry version: increases with every registration or deletion; -1 before the first"


# -- requests -------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _ClassifyOptions(_Request):
    top_k: int = Field(
        5, description="labels returned per image, 1 to FLATPROMPT_MAX_TOP_K (default 100)", examples=[3]
    )
    candidates: list[str] | None = Field(
        None,
        description="optional subset of class names (trained or registered) to choose from; an unknown "
        "name answers 404 unknown_class. At most FLATPROMPT_MAX_CANDIDATES names",
        examples=[list(TRAINED_EXAMPLES)],
    )
    tau: float = Field(
        0.0,
        description="post-hoc logit adjustment strength (0 = off, up to FLATPROMPT_MAX_TAU): subtracts "
        "tau * log(prior) of the trained class counts, favouring rare classes",
        examples=[0.0],
    )


class ClassifyRequest(_ClassifyOptions):
    """``/classify``: a multipart form; ``images`` repeated once per file, the other fields JSON values."""

    images: list[Path] = Field(
        description="image files (JPEG, PNG, WebP, GIF, BMP), at most FLATPROMPT_MAX_IMAGES_PER_REQUEST "
        "(default 16); the declared content type is not trusted, the bytes are decoded"
    )


class ClassifyBase64Request(_ClassifyOptions):
    """``/classify_base64``: the same as ``/classify`` with the images in a JSON body."""

    images: list[str] = Field(
        description="images as base64 strings or data: URLs, at most FLATPROMPT_MAX_IMAGES_PER_REQUEST",
        examples=[[SAMPLE_IMAGE_BASE64]],
    )


class RegisterRequest(_Request):
    """``/register``: class names to add (or re-embed with new templates)."""

    names: list[str] = Field(
        description="class names (1 to FLATPROMPT_MAX_NAME_LENGTH characters each, whitespace "
        "normalised, case-insensitive keys), at most FLATPROMPT_MAX_NAMES_PER_REGISTRATION",
        examples=[list(REGISTERED_EXAMPLES)],
    )
    templates: list[str] | None = Field(
        None,
        description="prompt templates, each with one {} for the name; their normalised embeddings are "
        "averaged. Default: the bundle's own template",
        examples=[list(TEMPLATE_EXAMPLES)],
    )
    examples: dict[str, list[str]] | None = Field(
        None,
        description="example images per name (base64 or data: URLs), added to the ones stored for the "
        "class; its prototype blends the text embedding with their mean embedding. At most "
        "FLATPROMPT_MAX_EXAMPLES_PER_CLASS (16) per class, FLATPROMPT_MAX_EXAMPLE_BYTES (4 MiB) each",
        examples=[{REGISTERED_EXAMPLES[0]: [SAMPLE_IMAGE_BASE64]}],
    )
    text_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="weight w of the text embedding in the blend w * text + (1 - w) * images; null: "
        "1 / (1 + sqrt(K)) for K examples; 0: the images alone (the name is only the label)",
        examples=[None],
    )
    text_path: Literal["learned", "handwritten", "ensemble"] | None = Field(
        None,
        description="how the name is embedded: learned (the bundle's text encoder with its learned context), "
        "handwritten (the frozen text tower over the hand-written template, as zero-shot CLIP), ensemble "
        "(the normalised mean of both); null: the class's own, else the bundle's measured default",
        examples=[None],
    )


class RegisterImagesRequest(_Request):
    """``/register_images``: one class from example image files (multipart, ``images`` repeated)."""

    name: str = Field(description="the class name (its label)", examples=[REGISTERED_EXAMPLES[0]])
    images: list[Path] = Field(
        description="example image files (JPEG, PNG, WebP, GIF, BMP), decoded as /classify decodes them; "
        "added to the ones stored for the class (at most FLATPROMPT_MAX_EXAMPLES_PER_CLASS in all)"
    )
    templates: list[str] | None = Field(
        None, description="prompt templates as in /register (JSON list)", examples=[list(TEMPLATE_EXAMPLES)]
    )
    text_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="as in /register; null: 1 / (1 + sqrt(K))", examples=[None]
    )
    text_path: Literal["learned", "handwritten", "ensemble"] | None = Field(
        None,
        description="how the name is embedded: learned (the bundle's text encoder with its learned context), "
        "handwritten (the frozen text tower over the hand-written template, as zero-shot CLIP), ensemble "
        "(the normalised mean of both); null: the class's own, else the bundle's measured default",
        examples=[None],
    )


class UnregisterRequest(_Request):
    """``/unregister``: one registered class to delete."""

    name: str = Field(
        description="a registered class name (case-insensitive)", examples=[REGISTERED_EXAMPLES[0]]
    )


class ClassesRequest(_Request):
    """``/classes``: which classes to list."""

    kind: Literal["all", "trained", "registered"] = Field("all", examples=["all"])


# -- responses ------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the service, whatever produced it."""

    error: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="stable machine-readable code to branch on (listed per status in each route)",
        examples=["invalid_image"],
    )
    message: str = Field(
        min_length=1,
        description="human-readable explanation; never echoes request content",
        examples=["image 1: not a decodable image (cannot identify image file)"],
    )


class Label(BaseModel):
    """One class of an image's top-k."""

    name: str = Field(description="class name as trained or registered", examples=[TRAINED_EXAMPLES[0]])
    kind: Kind = Field(description="trained: a class of the bundle; registered: added over /register")
    probability: float = Field(ge=0.0, le=1.0, description="softmax over the classes scored")


class ImageResult(BaseModel):
    """The top-k labels of one image, most probable first."""

    labels: list[Label]


class ClassifyResponse(BaseModel):
    """One result per uploaded image, in request order."""

    results: list[ImageResult]
    registry_version: int = Field(description="registry version whose classes were scored")
    bundle: str = _BUNDLE

    @classmethod
    def build(
        cls, results: list[list[dict[str, object]]], registry_version: int, bundle: str
    ) -> ClassifyResponse:
        """From :meth:`serving.scoring.ClassIndex.classify` output, without re-validating it."""
        return cls.model_construct(
            results=[ImageResult.model_construct(labels=[_label(x) for x in r]) for r in results],
            registry_version=registry_version,
            bundle=bundle,
        )


def _label(x: dict[str, object]) -> Label:
    return Label.model_construct(
        name=str(x["name"]), kind=cast(Kind, x["kind"]), probability=float(cast(float, x["probability"]))
    )


class RegisteredName(BaseModel):
    """What a registration did with one name."""

    name: str = Field(
        description="the name as stored (whitespace normalised)", examples=[REGISTERED_EXAMPLES[0]]
    )
    status: RegistrationStatus = Field(
        description="created: new; updated: new templates or re-embedded; unchanged: already registered "
        "with these templates; trained: a trained class, nothing stored"
    )
    kind: Kind


class RegisterResponse(BaseModel):
    """One entry per distinct name of the request (case-insensitive), in request order."""

    classes: list[RegisteredName]
    registered_total: int = Field(ge=0, description="registered classes after this call")
    registry_version: int = Field(description=_VERSION_DESC)


class UnregisterResponse(BaseModel):
    """The deleted class."""

    deleted: str = Field(
        description="the name as sent (whitespace normalised)", examples=[REGISTERED_EXAMPLES[0]]
    )
    registered_total: int = Field(ge=0, description="registered classes after this call")
    registry_version: int = Field(description=_VERSION_DESC)


class TrainedClass(BaseModel):
    """A class of the bundle."""

    name: str = Field(examples=[TRAINED_EXAMPLES[0]])
    count: int = Field(ge=0, description="training images of this class (the prior used by tau)")


class RegisteredClass(BaseModel):
    """A class added over ``/register``."""

    name: str = Field(examples=[REGISTERED_EXAMPLES[0]])
    templates: list[str] = Field(description="its prompt templates; empty: the bundle's own template")
    created_at: float = Field(description="registration time, Unix epoch seconds")
    examples: int = Field(0, ge=0, description="example images stored for the class")
    text_weight: float | None = Field(
        None, description="weight of the text embedding in its prototype; null: text only (no examples)"
    )
    text_path: Literal["learned", "handwritten", "ensemble"] = Field(
        "learned", description="how its name was embedded"
    )


def _absent(value: object) -> bool:
    return value is None


class ClassesResponse(BaseModel):
    """The class listing; ``trained`` / ``registered`` are present when ``kind`` asked for them."""

    registry_version: int = Field(description=_VERSION_DESC)
    bundle: str = _BUNDLE
    trained: list[TrainedClass] | None = Field(
        None, exclude_if=_absent, description="present when kind is all or trained"
    )
    registered: list[RegisteredClass] | None = Field(
        None, exclude_if=_absent, description="present when kind is all or registered"
    )
