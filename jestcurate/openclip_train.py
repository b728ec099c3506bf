"""`torchrun -m jestcurate.openclip_train -- --selection SEL [open_clip_train flags]`: open_clip's
own trainer on a selection's batches, in step order (jestcurate.trainer.openclip)."""

from jestcurate.trainer.openclip.launcher import main

if __name__ == "__main__":
    main()
