"""fedfleet's Flower app: model, data, ClientApp and ServerApp."""
