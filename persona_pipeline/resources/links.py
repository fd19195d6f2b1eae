"""The two base URLs that asset metadata links to, as a resource the assets ask for."""

import dagster as dg

from persona_pipeline.domain.links import Links


class UiLinks(dg.ConfigurableResource):
    """DAGSTER_UI_BASE_URL (runs) and REVIEW_BASE_URL (the review form, and its /media images that
    the Dagster UI shows inline)."""

    dagster_ui_base_url: str = "http://localhost:3000"
    review_base_url: str = "http://127.0.0.1:8090"

    @property
    def links(self) -> Links:
        return Links(dagster_ui=self.dagster_ui_base_url, review=self.review_base_url)
