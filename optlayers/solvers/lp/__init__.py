"""First-order LP / diagonal-QP solvers: PDHG (PDLP), adaptive PDHG, and SciPy-style ``linprog``."""


from .adaptive_pdhg import AdaptivePDHG
from .linprog import LinprogInfo, LinprogResult, LPGradient, diag_qp, linprog
from .pdhg import PDHG
from .preconditioning import LinOp, ruiz_pock_chambolle

__all__ = ["PDHG", "AdaptivePDHG", "LPGradient", "LinprogInfo", "LinprogResult", "linprog", "diag_qp",
           "LinOp", "ruiz_pock_chambolle"]
