"""The codebook stage: a VQGAN that turns images into token grids and back.

model (encoder, decoder, VQModel), quantize (lookup and collapse remedies), losses (PatchGAN, hinge,
adaptive weight), perceptual (offline LPIPS), diffaug (DiffAugment), train (`train_vq`), encode
(`encode_dataset`, `reconstruct_images`, `decode_artifact`), store (`load_vq`, `save_vq`).
"""
