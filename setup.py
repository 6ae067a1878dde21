"""The optional C accelerator (qcompile/_histogram.c): everything else is in pyproject.toml.

`optional=True`: where no C compiler or Python headers exist the install still succeeds and
qcompile counts histogram bins with numpy instead (the same counts, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("qcompile._histogram", ["qcompile/_histogram.c"], optional=True)])
