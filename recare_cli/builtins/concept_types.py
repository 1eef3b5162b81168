"""Built-in concept types: object, style, person (recare-method.md §4.2 templates)."""

from recare_cli.plugins import ConceptType

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

PERSON_TEMPLATES = (
    "a photo portrait of {}",
    "a DSLR portrait of {}",
)


def register(register):
    register(ConceptType(
        name="object", templates=OBJECT_TEMPLATES, care_style="photo", initializer_token="object",
        target_prompt="A photo of {}", default_metrics=("object", "care"),
        description="a thing or a visual property (nudity, cars, tench)",
    ))
    register(ConceptType(
        name="style", templates=STYLE_TEMPLATES, care_style="style", initializer_token="art",
        target_prompt="A painting in the style of {}", default_metrics=("style", "care"),
        description="an artist's style (Van Gogh)",
    ))
    register(ConceptType(
        name="person", templates=PERSON_TEMPLATES, care_style="photo", initializer_token="person",
        target_prompt="A photo of {}", default_metrics=("care",),
        description="a specific person's identity",
    ))
