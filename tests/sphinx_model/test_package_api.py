"""The package's own API (`from sphinx_model import ...`, as the README shows it) reaches the rooms."""
import sphinx_model
from sphinx_model.loading import checkpoint
from sphinx_model.serving import generation


def test_every_name_of_the_package_api_resolves():
    for name in sphinx_model.__all__:
        assert getattr(sphinx_model, name) is not None


def test_the_readme_imports_are_the_rooms_objects():
    from sphinx_model import GenerationSettings, Generator, from_pretrained, load_model, save_pretrained

    assert (from_pretrained, load_model, save_pretrained) == (checkpoint.from_pretrained, checkpoint.load_model,
                                                              checkpoint.save_pretrained)
    assert (Generator, GenerationSettings) == (generation.Generator, generation.GenerationSettings)
