"""Package discovery for the wheel (everything else is in pyproject.toml).

Three source folders install under one import root: `moemesh/` as `moemesh`, `kernels/` as `moemesh.kernels`,
`services/` as `moemesh.services` (DESIGN §2), and the demo checkpoint `models/demo/` as the data-only package
`moemesh.demo`, so `--model demo` works from an installed wheel. Every subpackage is found here, never listed
by hand: a new `services/<role>/` ships without touching this file.
"""

from setuptools import find_packages, setup

# import name -> source folder
ROOTS = {"moemesh": "moemesh", "moemesh.kernels": "kernels", "moemesh.services": "services"}
DEMO = ("moemesh.demo", "models/demo")


def discover() -> list[str]:
    packages = []
    for name, folder in ROOTS.items():
        packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return [*packages, DEMO[0]]


setup(
    packages=discover(),
    package_dir={**ROOTS, DEMO[0]: DEMO[1]},
    # Every file beside the modules (type stubs, the demo checkpoint's files); subfolders that are not
    # packages stay out: the demo's training corpus and the BF16 copy its tests compare with (about 10 MB).
    package_data={"": ["*"]},
)
