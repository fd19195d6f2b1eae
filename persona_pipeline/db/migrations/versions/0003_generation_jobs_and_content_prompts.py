"""generation jobs, content prompts, multi-step run settings, curation scores, chained LoRAs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('content_prompts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('persona_id', sa.Integer(), nullable=False),
    sa.Column('pillar_id', sa.Integer(), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('negative_prompt', sa.Text(), nullable=False),
    sa.Column('theme', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=120), nullable=False),
    sa.Column('gaps', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['persona_id'], ['personas.id'], name=op.f('fk_content_prompts_persona_id_personas'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pillar_id'], ['content_pillars.id'], name=op.f('fk_content_prompts_pillar_id_content_pillars'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_content_prompts'))
    )
    op.create_index(op.f('ix_content_prompts_persona_id'), 'content_prompts', ['persona_id'], unique=False)

    op.create_table('generation_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('step_id', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('parent_key', sa.Integer(), nullable=False),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=False),
    sa.Column('server', sa.String(length=300), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('permanent', sa.Boolean(), nullable=False),
    sa.Column('dagster_run_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['generation_runs.id'], name=op.f('fk_generation_jobs_run_id_generation_runs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['step_id'], ['run_steps.id'], name=op.f('fk_generation_jobs_step_id_run_steps'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['candidates.id'], name=op.f('fk_generation_jobs_parent_id_candidates'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_generation_jobs')),
    sa.UniqueConstraint('step_id', 'parent_key', 'slot', name=op.f('uq_generation_jobs_step_id_parent_key_slot'))
    )
    op.create_index(op.f('ix_generation_jobs_run_id'), 'generation_jobs', ['run_id'], unique=False)
    op.create_index(op.f('ix_generation_jobs_step_id'), 'generation_jobs', ['step_id'], unique=False)
    op.create_index(op.f('ix_generation_jobs_status'), 'generation_jobs', ['status'], unique=False)

    # batch mode: SQLite cannot add a foreign key or a unique key to an existing table in place.
    with op.batch_alter_table('persona_loras') as batch:
        batch.add_column(sa.Column('chained', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('generation_runs') as batch:
        batch.add_column(sa.Column('content_prompt_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('prompt_source', sa.String(length=120), nullable=True))
        batch.add_column(sa.Column('pipeline', sa.JSON(), nullable=False, server_default='{}'))
        batch.add_column(sa.Column('failure_reason', sa.Text(), nullable=True))
        batch.create_foreign_key(op.f('fk_generation_runs_content_prompt_id_content_prompts'), 'content_prompts',
                                 ['content_prompt_id'], ['id'], ondelete='SET NULL')
    with op.batch_alter_table('run_steps') as batch:
        batch.add_column(sa.Column('backend', sa.String(length=32), nullable=True))
        batch.add_column(sa.Column('template_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('params', sa.JSON(), nullable=False, server_default='{}'))
        batch.add_column(sa.Column('keep_best', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('parent_ids', sa.JSON(), nullable=False, server_default='[]'))
        batch.add_column(sa.Column('failure_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('candidates') as batch:
        batch.add_column(sa.Column('status_reason', sa.Text(), nullable=True))
        batch.add_column(sa.Column('job_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('identity_score', sa.Float(), nullable=True))
        batch.create_foreign_key(op.f('fk_candidates_job_id_generation_jobs'), 'generation_jobs', ['job_id'], ['id'], ondelete='SET NULL')
        batch.create_unique_constraint(op.f('uq_candidates_job_id'), ['job_id'])


def downgrade() -> None:
    with op.batch_alter_table('candidates') as batch:
        batch.drop_constraint(op.f('uq_candidates_job_id'), type_='unique')
        batch.drop_constraint(op.f('fk_candidates_job_id_generation_jobs'), type_='foreignkey')
        for column in ('identity_score', 'job_id', 'status_reason'):
            batch.drop_column(column)
    with op.batch_alter_table('run_steps') as batch:
        for column in ('failure_reason', 'parent_ids', 'keep_best', 'params', 'template_sha256', 'backend'):
            batch.drop_column(column)
    with op.batch_alter_table('generation_runs') as batch:
        batch.drop_constraint(op.f('fk_generation_runs_content_prompt_id_content_prompts'), type_='foreignkey')
        for column in ('failure_reason', 'pipeline', 'prompt_source', 'content_prompt_id'):
            batch.drop_column(column)
    with op.batch_alter_table('persona_loras') as batch:
        batch.drop_column('chained')
    for index in ('status', 'step_id', 'run_id'):
        op.drop_index(op.f(f'ix_generation_jobs_{index}'), table_name='generation_jobs')
    op.drop_table('generation_jobs')
    op.drop_index(op.f('ix_content_prompts_persona_id'), table_name='content_prompts')
    op.drop_table('content_prompts')
