"""The public names of am_automodel."""

import am_automodel


def test_all() -> None:
    assert am_automodel.__all__ == [
        "ModelSpec",
        "Recipe",
        "RecipeError",
        "TrainResult",
        "load_recipe",
        "register_model",
        "register_preset",
        "run",
    ]
    for name in am_automodel.__all__:
        assert getattr(am_automodel, name) is not None
