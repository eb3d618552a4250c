"""kbench recipes: runnable training scripts that are also importable templates.

    from recipes import cifar_resnet
    metrics = cifar_resnet.main(cifar_resnet.Config(dataset="synthetic", epochs=1))
"""
