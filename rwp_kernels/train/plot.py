"""curves.png: test loss and test accuracy per epoch, one line per optimizer (mean over seeds)."""


def plot_curves(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for method, histories in results.items():
        epochs = [r["epoch"] for r in histories[0]]
        for ax, key in ((ax_loss, "test_loss"), (ax_acc, "test_acc")):
            mean = [sum(h[i][key] for h in histories) / len(histories) for i in range(len(epochs))]
            ax.plot(epochs, mean, label=f"{method} ({len(histories)} seed{'s' if len(histories) > 1 else ''})")
    for ax, title in ((ax_loss, "test loss"), (ax_acc, "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
