"""The Gradio app: one module per tab (`build_<tab>_tab`), the page (`ui.build_ui`) and the command line."""
