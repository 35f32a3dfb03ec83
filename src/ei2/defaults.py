"""The generic defaults of ei2, in one place (DESIGN §1.6, §1.7).

Library signatures (`TuningConfig`, `EI2Pipeline.tune/invert/__call__`, the control modules) and the
command-line `Settings` read these names, so that they cannot disagree. Defaults that depend on the
model (resolution, steps of a small model) are not here: they live beside the model's weights in
`<model>/ei2_defaults.json` (`config.apply_model_defaults`).
"""

# The file of a model folder that holds that model's own defaults (DESIGN §1.6).
MODEL_DEFAULTS_FILE = "ei2_defaults.json"

# One-shot tuning (DESIGN §1.6; Tune-A-Video's): AdamW lr 3e-5, 500 steps, grad clip 1.0.
STEPS = 500
LEARNING_RATE = 3e-5
MAX_GRAD_NORM = 1.0
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8
CHECKPOINT_EVERY = 100  # of the CLI; the library writes no checkpoints unless asked

# Inversion and editing (DESIGN §1.7): DDIM, 50 steps, classifier-free guidance 12.5.
INFERENCE_STEPS = 50
GUIDANCE_SCALE = 12.5

# Edit strength (img2img's): the fraction of the DDIM grid that is inverted and sampled again (1: all of it).
STRENGTH = 1.0
# Rescaled classifier-free guidance (Lin et al. 2024, phi; 0: off), its std per "video" or per "frame".
GUIDANCE_RESCALE = 0.0
GUIDANCE_RESCALE_STD = "video"

# Inversion that gives Gaussian noise (pix2pix-zero, Parmar et al. 2023; diffusers' pix2pix-zero pipeline): each
# predicted noise of the inversion is moved down the gradient of an auto-correlation and a KL penalty.
NOISE_REG_AUTO_CORR = 20.0
NOISE_REG_KL = 20.0
NOISE_REG_STEPS = 5
NOISE_REG_ROLLS = 5

# Null-text inversion (Mokady et al. 2023): inner Adam iterations per step, their lr, early stop.
NULL_TEXT_INNER_STEPS = 10
NULL_TEXT_LEARNING_RATE = 1e-2
NULL_TEXT_EARLY_STOP_EPSILON = 1e-5

# Source video sampling of the CLI.
FRAMES = 8

# Structure-preserving injection (DESIGN §1.9): off unless a model's ei2_defaults.json or the user turns it
# on. Decoder block whose ResNet features are injected (attention: that block and every finer one).
# Published settings for Stable Diffusion (Plug-and-Play, TokenFlow): features 0.8, attention 0.5, block 1.
INJECT_FEATURES = 0.0
INJECT_ATTENTION = 0.0
INJECT_BLOCK = 1
SD_INJECT_FEATURES = 0.8
SD_INJECT_ATTENTION = 0.5

# Long videos (DESIGN §1.10): windows of WINDOW frames (the longest clip Tune-A-Video tunes and edits at once, so
# that 8-24 frame runs are edited whole, exactly as without windows; a model may set its own in its
# ei2_defaults.json, Shapes: 8), overlapping by half a window; ANCHOR_FRAMES frames spread over the whole video
# whose coarse tokens every window's FFAM also sees; WINDOW_BATCH windows per UNet call (more: faster on a GPU,
# more memory; controlled edits run one window per call).
WINDOW = 24
ANCHOR_FRAMES = 3
WINDOW_BATCH = 1
