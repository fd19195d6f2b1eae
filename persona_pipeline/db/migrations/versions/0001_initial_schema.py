"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('personas',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('trigger_word', sa.String(length=40), nullable=False),
    sa.Column('class_word', sa.String(length=40), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('folder', sa.Text(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('settings_hash', sa.String(length=64), nullable=False),
    sa.Column('photos_hash', sa.String(length=64), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_personas')),
    sa.UniqueConstraint('slug', name=op.f('uq_personas_slug'))
    )
    op.create_table('content_pillars',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=80), nullable=False),
    sa.Column('weight', sa.Integer(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('starts_on', sa.Date(), nullable=True),
    sa.Column('ends_on', sa.Date(), nullable=True),
    sa.Column('guidelines', sa.Text(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('target_posts_per_week', sa.Integer(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.CheckConstraint('priority BETWEEN 1 AND 5', name=op.f('ck_content_pillars_priority_range')),
    sa.CheckConstraint('weight BETWEEN 0 AND 100', name=op.f('ck_content_pillars_weight_range')),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_content_pillars_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_content_pillars')),
    sa.UniqueConstraint('persona_id', 'name', name=op.f('uq_content_pillars_persona_id_name'))
    )
    with op.batch_alter_table('content_pillars', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_content_pillars_persona_id'), ['persona_id'], unique=False)

    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('image_count', sa.Integer(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_datasets_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('persona_id', 'version', name=op.f('uq_datasets_persona_id_version'))
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datasets_persona_id'), ['persona_id'], unique=False)

    op.create_table('review_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('subject_type', sa.String(length=32), nullable=False),
    sa.Column('subject_id', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=80), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_review_events_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_review_events'))
    )
    with op.batch_alter_table('review_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_review_events_persona_id'), ['persona_id'], unique=False)

    op.create_table('source_photos',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('original_name', sa.String(length=255), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('path', sa.Text(), nullable=True),
    sa.Column('pixel_sha256', sa.String(length=64), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('caption', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_source_photos_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_source_photos')),
    sa.UniqueConstraint('persona_id', 'original_name', name=op.f('uq_source_photos_persona_id_original_name'))
    )
    with op.batch_alter_table('source_photos', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_source_photos_persona_id'), ['persona_id'], unique=False)

    op.create_table('clusters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=True),
    sa.Column('centroid', sa.JSON(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_clusters_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_clusters_pillar_id_content_pillars'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_clusters'))
    )
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_clusters_persona_id'), ['persona_id'], unique=False)

    op.create_table('generation_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('dagster_run_id', sa.String(length=64), nullable=True),
    sa.Column('winner_candidate_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_generation_runs_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_generation_runs_pillar_id_content_pillars'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['winner_candidate_id'], ['candidates.id'], name=op.f('fk_generation_runs_winner_candidate_id_candidates'), ondelete='SET NULL', use_alter=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generation_runs'))
    )
    with op.batch_alter_table('generation_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_generation_runs_persona_id'), ['persona_id'], unique=False)

    op.create_table('lora_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('base_model', sa.Text(), nullable=False),
    sa.Column('trigger_word', sa.String(length=40), nullable=True),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('training', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_lora_models_dataset_id_datasets'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lora_models')),
    sa.UniqueConstraint('sha256', name=op.f('uq_lora_models_sha256'))
    )
    op.create_table('persona_loras',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('lora_id', sa.Integer(), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('is_primary', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['lora_id'], ['lora_models.id'], name=op.f('fk_persona_loras_lora_id_lora_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_persona_loras_persona_id_personas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_persona_loras')),
    sa.UniqueConstraint('persona_id', 'lora_id', name=op.f('uq_persona_loras_persona_id_lora_id'))
    )
    with op.batch_alter_table('persona_loras', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_persona_loras_persona_id'), ['persona_id'], unique=False)

    op.create_table('run_steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=80), nullable=False),
    sa.Column('workflow', sa.String(length=200), nullable=False),
    sa.Column('n_candidates', sa.Integer(), nullable=False),
    sa.Column('top_k', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('approved_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['generation_runs.id'], name=op.f('fk_run_steps_run_id_generation_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_run_steps')),
    sa.UniqueConstraint('run_id', 'position', name=op.f('uq_run_steps_run_id_position'))
    )
    with op.batch_alter_table('run_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_run_steps_run_id'), ['run_id'], unique=False)

    op.create_table('candidates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('lora_id', sa.Integer(), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('image_path', sa.Text(), nullable=False),
    sa.Column('image_sha256', sa.String(length=64), nullable=False),
    sa.Column('manifest_path', sa.Text(), nullable=False),
    sa.Column('elo', sa.Integer(), nullable=False),
    sa.Column('bt_score', sa.Float(), nullable=True),
    sa.Column('bt_ci_low', sa.Float(), nullable=True),
    sa.Column('bt_ci_high', sa.Float(), nullable=True),
    sa.Column('clip_score', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lora_id'], ['lora_models.id'], name=op.f('fk_candidates_lora_id_lora_models'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['parent_id'], ['candidates.id'], name=op.f('fk_candidates_parent_id_candidates'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['run_id'], ['generation_runs.id'], name=op.f('fk_candidates_run_id_generation_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['step_id'], ['run_steps.id'], name=op.f('fk_candidates_step_id_run_steps'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_candidates'))
    )
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_candidates_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_candidates_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_candidates_step_id'), ['step_id'], unique=False)

    # generation_runs and candidates refer to each other. SQLite accepts the forward reference
    # inline (above); PostgreSQL needs the constraint added once both tables exist.
    if op.get_bind().dialect.name != "sqlite":
        op.create_foreign_key(op.f('fk_generation_runs_winner_candidate_id_candidates'), 'generation_runs', 'candidates',
                              ['winner_candidate_id'], ['id'], ondelete='SET NULL')

    op.create_table('cluster_members',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cluster_id', sa.Integer(), nullable=False),
    sa.Column('candidate_id', sa.Integer(), nullable=False),
    sa.Column('distance', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_cluster_members_candidate_id_candidates'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['cluster_id'], ['clusters.id'], name=op.f('fk_cluster_members_cluster_id_clusters'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cluster_members')),
    sa.UniqueConstraint('cluster_id', 'candidate_id', name=op.f('uq_cluster_members_cluster_id_candidate_id'))
    )
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cluster_members_cluster_id'), ['cluster_id'], unique=False)

    op.create_table('posts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=True),
    sa.Column('candidate_id', sa.Integer(), nullable=False),
    sa.Column('account', sa.String(length=120), nullable=False),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('caption', sa.Text(), nullable=False),
    sa.Column('hashtags', sa.JSON(), nullable=False),
    sa.Column('media_path', sa.Text(), nullable=True),
    sa.Column('scheduled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('retry_count', sa.Integer(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['candidate_id'], ['candidates.id'], name=op.f('fk_posts_candidate_id_candidates'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_posts_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_posts_pillar_id_content_pillars'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_posts')),
    sa.UniqueConstraint('account', 'scheduled_at', name=op.f('uq_posts_account_scheduled_at'))
    )
    with op.batch_alter_table('posts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_posts_persona_id'), ['persona_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_posts_status'), ['status'], unique=False)

    op.create_table('votes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=False),
    sa.Column('winner_id', sa.Integer(), nullable=False),
    sa.Column('loser_id', sa.Integer(), nullable=False),
    sa.Column('pair_low_id', sa.Integer(), nullable=False),
    sa.Column('pair_high_id', sa.Integer(), nullable=False),
    sa.Column('winner_elo_before', sa.Integer(), nullable=False),
    sa.Column('loser_elo_before', sa.Integer(), nullable=False),
    sa.Column('elo_delta', sa.Integer(), nullable=False),
    sa.Column('selection_probability', sa.Float(), nullable=True),
    sa.Column('reviewer', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('winner_id <> loser_id', name=op.f('ck_votes_not_self')),
    sa.ForeignKeyConstraint(['loser_id'], ['candidates.id'], name=op.f('fk_votes_loser_id_candidates'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['step_id'], ['run_steps.id'], name=op.f('fk_votes_step_id_run_steps'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['winner_id'], ['candidates.id'], name=op.f('fk_votes_winner_id_candidates'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_votes')),
    sa.UniqueConstraint('pair_low_id', 'pair_high_id', name=op.f('uq_votes_pair_low_id_pair_high_id'))
    )
    with op.batch_alter_table('votes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_votes_step_id'), ['step_id'], unique=False)

    op.create_table('post_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('post_id', sa.Integer(), nullable=False),
    sa.Column('publisher', sa.String(length=40), nullable=False),
    sa.Column('outcome', sa.String(length=24), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['post_id'], ['posts.id'], name=op.f('fk_post_attempts_post_id_posts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_post_attempts'))
    )
    with op.batch_alter_table('post_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_post_attempts_post_id'), ['post_id'], unique=False)




def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(op.f('fk_generation_runs_winner_candidate_id_candidates'), 'generation_runs', type_='foreignkey')

    with op.batch_alter_table('post_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_post_attempts_post_id'))

    op.drop_table('post_attempts')
    with op.batch_alter_table('votes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_votes_step_id'))

    op.drop_table('votes')
    with op.batch_alter_table('posts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_posts_status'))
        batch_op.drop_index(batch_op.f('ix_posts_persona_id'))

    op.drop_table('posts')
    with op.batch_alter_table('cluster_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cluster_members_cluster_id'))

    op.drop_table('cluster_members')
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_candidates_step_id'))
        batch_op.drop_index(batch_op.f('ix_candidates_run_id'))
        batch_op.drop_index(batch_op.f('ix_candidates_parent_id'))

    op.drop_table('candidates')
    with op.batch_alter_table('run_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_run_steps_run_id'))

    op.drop_table('run_steps')
    with op.batch_alter_table('persona_loras', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_persona_loras_persona_id'))

    op.drop_table('persona_loras')
    op.drop_table('lora_models')
    with op.batch_alter_table('generation_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_generation_runs_persona_id'))

    op.drop_table('generation_runs')
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_clusters_persona_id'))

    op.drop_table('clusters')
    with op.batch_alter_table('source_photos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_source_photos_persona_id'))

    op.drop_table('source_photos')
    with op.batch_alter_table('review_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_review_events_persona_id'))

    op.drop_table('review_events')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_persona_id'))

    op.drop_table('datasets')
    with op.batch_alter_table('content_pillars', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_content_pillars_persona_id'))

    op.drop_table('content_pillars')
    op.drop_table('personas')

