import os

from hypothesis import settings as hyp_settings

# CI runs the contract fuzzing at full size; local runs can set HYPOTHESIS_PROFILE=dev to go faster.
hyp_settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
hyp_settings.register_profile("dev", deadline=None, max_examples=50)
hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
